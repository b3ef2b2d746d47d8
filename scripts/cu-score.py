#!/usr/bin/env python3
"""Scores a log of libiscsi's iscsi-test-cu (CUnit's basic interface, verbose mode).

CUnit's own verdict is not enough: a test that finds the target lacks what it needs prints
"[SKIPPED] ..." and returns, which CUnit counts as passed, and a test may log a failed check
("[FAILED] ...") without asserting on it. Each test is therefore one of:

  passed   CUnit passed it and it logged neither [SKIPPED] nor [FAILED]
  skipped  CUnit passed it and it logged [SKIPPED] (and no [FAILED])
  warned   CUnit passed it although it logged [FAILED]
  failed   CUnit marked it FAILED, or the log ends before its verdict

A suite whose initialization or cleanup CUnit reports as failed is listed as a failed entry
SUITE.(init) or SUITE.(cleanup): the tests of a suite that could not start never appear.

The log format, as CUnit 2.1 and iscsi-test-cu write it (stdout and stderr to one file):

  Suite: NAME
    Test: NAME ...<the test's own output>passed|FAILED
      1. file.c:LINE  - <failed assertion>        (one line per failure, after FAILED)
  <suite cleanup output>
  ...
  Run Summary:    Type  Total    Ran Passed Failed Inactive

CUnit prints the verdict without a newline, right after "..." when the test printed nothing,
else at the start of the line after its output; whatever follows the verdict (on the same line
or later, up to the next test or suite) is the next test's set-up or the suite's cleanup and
does not count for the test. The counts are checked against CUnit's Run Summary: a log that
lacks it (the run was cut short) or disagrees with it is reported as incomplete.

Usage: cu-score.py LOG [--tests | --json | --output SUITE.TEST]
  (default)  one summary line: "iscsi-test-cu: P passed, F failed, S skipped, W warned, T total"
  --tests    one line per test, "STATUS   SUITE.TEST", sorted by name
  --json     the summary, the CUnit totals and every test with its output, as JSON
  --output   the test's own output, then the CUnit failure lines of a failed test
Exit status: 0 when the log is complete and consistent, 1 when it is not (the output is
still printed), 2 on a usage error or an unreadable log.
"""

import json
import re
import sys

USAGE = "usage: cu-score.py LOG [--tests | --json | --output SUITE.TEST]"
STATUSES = ("passed", "failed", "skipped", "warned")

SUITE_RE = re.compile(r"^Suite: (\S+)\s*$")
TEST_RE = re.compile(r"^  Test: (\S+) \.\.\.(.*)$")
VERDICT_RE = re.compile(r"^(passed|FAILED)(.*)$")
FAILURE_RE = re.compile(r"^    \d+\. \S+:\d+  - ")
SUITE_FAILURE_RE = re.compile(r"WARNING - Suite (initialization|cleanup) failed for '([^']*)'\.")
SUMMARY_RE = re.compile(r"^Run Summary:")
TOTALS_RE = re.compile(r"^\s+(suites|tests|asserts)\s+(\d+)\s+(\d+)\s+(\d+|n/a)\s+(\d+)\s+(\d+|n/a)\s*$")


class Test:
    def __init__(self, suite, name):
        self.name = f"{suite}.{name}"
        self.output = []  # the test's own lines, before its verdict
        self.verdict = None  # "passed" or "FAILED"
        self.failures = []  # CUnit's failure lines after FAILED

    def status(self):
        if self.verdict != "passed":
            return "failed"
        if any("[FAILED]" in line for line in self.output):
            return "warned"
        if any("[SKIPPED]" in line for line in self.output):
            return "skipped"
        return "passed"


class Score:
    def __init__(self):
        self.tests = []
        self.suite_failures = []  # (suite, "init" or "cleanup")
        self.totals = {}  # CUnit's Run Summary rows: name -> (total, ran, passed, failed, inactive)
        self.problems = []

    def entries(self):
        """(status, name) of every test and failed suite set-up, sorted by name."""
        rows = [(t.status(), t.name) for t in self.tests]
        rows += [("failed", f"{s}.({what})") for s, what in self.suite_failures]
        return sorted(rows, key=lambda r: r[1])

    def counts(self):
        c = dict.fromkeys(STATUSES, 0)
        for status, _ in self.entries():
            c[status] += 1
        c["total"] = sum(c[s] for s in STATUSES)
        return c

    def summary(self):
        c = self.counts()
        line = "iscsi-test-cu: " + ", ".join(f"{c[s]} {s}" for s in STATUSES) + f", {c['total']} total"
        if self.problems:
            line += " (incomplete: " + "; ".join(self.problems) + ")"
        return line


def parse(lines):
    score = Score()
    suite = None
    test = None  # the test whose verdict or failure lines may still come
    in_failures = False
    in_summary = False

    def text(chunk):
        """A piece of the log (a line, or the rest of one) while a test is open."""
        nonlocal in_failures
        if test.verdict is None:
            m = VERDICT_RE.match(chunk)
            if m:
                test.verdict = m.group(1)
                in_failures = test.verdict == "FAILED"
            else:
                test.output.append(chunk)
        elif in_failures and FAILURE_RE.match(chunk):
            test.failures.append(chunk)
        else:
            in_failures = False

    for raw in lines:
        line = raw.rstrip("\n")
        for what, name in SUITE_FAILURE_RE.findall(line):
            score.suite_failures.append((name, "init" if what == "initialization" else "cleanup"))
        if in_summary:
            m = TOTALS_RE.match(line)
            if m:
                score.totals[m.group(1)] = tuple(None if v == "n/a" else int(v) for v in m.groups()[1:])
            continue
        if SUMMARY_RE.match(line):
            in_summary = True
            test = None
            continue
        m = SUITE_RE.match(line)
        if m:
            suite, test = m.group(1), None
            continue
        m = TEST_RE.match(line)
        if m:
            if suite is None:
                score.problems.append(f"test {m.group(1)} outside any suite")
                suite = "?"
            test = Test(suite, m.group(1))
            score.tests.append(test)
            in_failures = False
            if m.group(2):
                text(m.group(2))
            continue
        if test is not None:
            text(line)

    missing = [t.name for t in score.tests if t.verdict is None]
    if missing:
        score.problems.append("no verdict for " + ", ".join(missing))
    tests = score.totals.get("tests")
    if tests is None:
        score.problems.append("no CUnit run summary")
    else:
        ran, failed = tests[1], tests[3]
        mine_ran = sum(1 for t in score.tests if t.verdict is not None)
        mine_failed = sum(1 for t in score.tests if t.verdict == "FAILED")
        if (ran, failed) != (mine_ran, mine_failed):
            score.problems.append(
                f"CUnit ran {ran} tests and failed {failed}, the log shows {mine_ran} and {mine_failed}"
            )
        suites = score.totals.get("suites")
        if suites is not None and suites[3] != len(score.suite_failures):
            score.problems.append(
                f"CUnit counts {suites[3]} failed suites, the log shows {len(score.suite_failures)}"
            )
    return score


def main(argv):
    args = argv[1:]
    mode, target = "summary", None
    if len(args) == 2 and args[1] in ("--tests", "--json"):
        mode = args[1][2:]
    elif len(args) == 3 and args[1] == "--output":
        mode, target = "output", args[2]
    elif len(args) != 1 or args[0].startswith("--"):
        print(USAGE, file=sys.stderr)
        return 2
    try:
        with open(args[0], encoding="utf-8", errors="replace") as f:
            score = parse(f)
    except OSError as e:
        print(f"cu-score.py: cannot read {args[0]}: {e}", file=sys.stderr)
        return 2

    if mode == "summary":
        print(score.summary())
    elif mode == "tests":
        for status, name in score.entries():
            print(f"{status:<8} {name}")
    elif mode == "json":
        totals = {
            row: dict(zip(("total", "ran", "passed", "failed", "inactive"), v))
            for row, v in score.totals.items()
        }
        tests = [
            {"name": t.name, "status": t.status(), "output": t.output, "failures": t.failures}
            for t in sorted(score.tests, key=lambda t: t.name)
        ]
        suites = [{"suite": s, "failed": what} for s, what in score.suite_failures]
        doc = {
            "summary": score.counts(),
            "complete": not score.problems,
            "problems": score.problems,
            "cunit": totals,
            "suite_failures": suites,
            "tests": tests,
        }
        print(json.dumps(doc, indent=1))
    else:
        found = [t for t in score.tests if t.name == target]
        if not found:
            print(f"cu-score.py: no test {target} in {args[0]}", file=sys.stderr)
            return 2
        for t in found:
            for line in t.output + t.failures:
                print(line)
    return 1 if score.problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
