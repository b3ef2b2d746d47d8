//! With the `dpdk` feature: finds DPDK through pkg-config, generates its bindings with bindgen
//! and compiles the C shim in `vendor/dpdk-shim/`. Without it, nothing (no DPDK, no libclang).

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    #[cfg(feature = "dpdk")]
    dpdk::build();
}

#[cfg(feature = "dpdk")]
mod dpdk {
    use std::path::PathBuf;

    pub fn build() {
        println!("cargo:rerun-if-changed=vendor/dpdk-shim/shim.h");
        println!("cargo:rerun-if-changed=vendor/dpdk-shim/shim.c");
        let lib = match pkg_config::Config::new()
            .atleast_version("22.11")
            .probe("libdpdk")
        {
            Ok(l) => l,
            Err(e) => panic!(
                "the dpdk feature needs DPDK 22.11 or later found by pkg-config as libdpdk \
                 (Debian: apt-get install libdpdk-dev pkg-config): {e}"
            ),
        };
        // DPDK's headers need its own flags (-include rte_config.h, -march): take them from
        // pkg-config as they are, for both the shim and bindgen.
        let out = std::process::Command::new("pkg-config")
            .args(["--cflags", "libdpdk"])
            .output()
            .expect("pkg-config runs");
        let flags: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .map(str::to_owned)
            .collect();

        let mut cc = cc::Build::new();
        cc.file("vendor/dpdk-shim/shim.c")
            .opt_level(3)
            .warnings(false);
        for f in &flags {
            cc.flag(f);
        }
        cc.compile("itgt_dpdk_shim");

        let mut b = bindgen::Builder::default()
            .header("vendor/dpdk-shim/shim.h")
            .clang_args(&flags)
            .clang_args(lib.include_paths.iter().map(|p| format!("-I{}", p.display())))
            .allowlist_function("itgt_.*")
            .allowlist_function("rte_eal_init|rte_eal_cleanup|rte_strerror|rte_thread_register|rte_thread_unregister")
            .allowlist_function("rte_socket_id|rte_lcore_count|rte_version")
            .allowlist_function("rte_eth_dev_(configure|start|stop|close|info_get|get_port_by_name|socket_id|get_mtu|set_mtu|count_avail|get_name_by_port)")
            .allowlist_function("rte_eth_(rx|tx)_queue_setup|rte_eth_macaddr_get|rte_eth_link_get_nowait|rte_eth_stats_get|rte_eth_promiscuous_enable")
            .allowlist_function("rte_pktmbuf_pool_create|rte_mempool_free|rte_mempool_avail_count|rte_mempool_in_use_count")
            .allowlist_function("rte_malloc_socket|rte_free|rte_malloc_get_socket_stats")
            .allowlist_type("rte_eth_conf|rte_eth_dev_info|rte_eth_stats|rte_eth_link|rte_ether_addr|rte_eth_rxconf|rte_eth_txconf|rte_malloc_socket_stats")
            .opaque_type("rte_mbuf|rte_mempool")
            .layout_tests(false)
            .derive_default(true)
            .generate_comments(false)
            .parse_callbacks(Box::new(bindgen::CargoCallbacks::new()));
        b = b.size_t_is_usize(true);
        // The link lines pkg-config printed above cover the libraries.
        let bindings = b.generate().expect("bindgen over DPDK's headers");
        let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
        bindings
            .write_to_file(out.join("dpdk.rs"))
            .expect("writing the DPDK bindings");
    }
}
