/* What the Rust bindings see of DPDK: the headers of the calls it makes, and the shim's own
 * functions that export DPDK's static-inline fast-path functions as real symbols. */
#ifndef ISCSI_TGT_DPDK_SHIM_H
#define ISCSI_TGT_DPDK_SHIM_H

#include <rte_eal.h>
#include <rte_errno.h>
#include <rte_ethdev.h>
#include <rte_lcore.h>
#include <rte_malloc.h>
#include <rte_mbuf.h>
#include <rte_mempool.h>
#include <rte_version.h>

/* rte_errno of the calling thread. */
int itgt_errno(void);
/* The calling thread's lcore id (LCORE_ID_ANY when it has none). */
unsigned itgt_lcore_id(void);

uint16_t itgt_rx_burst(uint16_t port, uint16_t queue, struct rte_mbuf **pkts, uint16_t n);
uint16_t itgt_tx_burst(uint16_t port, uint16_t queue, struct rte_mbuf **pkts, uint16_t n);
uint16_t itgt_tx_prepare(uint16_t port, uint16_t queue, struct rte_mbuf **pkts, uint16_t n);

/* Fills `pkts` with `n` fresh mbufs from `pool`: 0 on success, a negative errno otherwise
 * (all or nothing). */
int itgt_alloc_bulk(struct rte_mempool *pool, struct rte_mbuf **pkts, unsigned n);
void itgt_free(struct rte_mbuf *m);

/* The first segment's data and its length; the whole packet's length and segment count. */
void *itgt_data(struct rte_mbuf *m);
uint16_t itgt_data_len(const struct rte_mbuf *m);
uint32_t itgt_pkt_len(const struct rte_mbuf *m);
uint16_t itgt_nb_segs(const struct rte_mbuf *m);
struct rte_mbuf *itgt_next(const struct rte_mbuf *m);
/* Room for data after the headroom in a fresh mbuf. */
uint16_t itgt_tailroom(const struct rte_mbuf *m);
/* Sets a fresh single-segment mbuf to hold `len` bytes. */
void itgt_set_len(struct rte_mbuf *m, uint16_t len);
/* Offload requests of an outgoing frame: checksum (l4 TCP) and optionally TSO. */
void itgt_set_tx_offload(struct rte_mbuf *m, uint64_t ol_flags, uint16_t l2, uint16_t l3, uint16_t l4,
                         uint16_t tso_segsz);
uint64_t itgt_ol_flags(const struct rte_mbuf *m);

/* The constants the Rust side needs, as values (several are macros built of other macros). */
uint64_t itgt_const(int which);

#endif
