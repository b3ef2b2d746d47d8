/* DPDK's fast-path functions are static inline in its headers; these wrappers give them
 * symbols the Rust side can call. Nothing here keeps state. */
#include "shim.h"

int itgt_errno(void) { return rte_errno; }
unsigned itgt_lcore_id(void) { return rte_lcore_id(); }

uint16_t itgt_rx_burst(uint16_t port, uint16_t queue, struct rte_mbuf **pkts, uint16_t n)
{
    return rte_eth_rx_burst(port, queue, pkts, n);
}

uint16_t itgt_tx_burst(uint16_t port, uint16_t queue, struct rte_mbuf **pkts, uint16_t n)
{
    return rte_eth_tx_burst(port, queue, pkts, n);
}

uint16_t itgt_tx_prepare(uint16_t port, uint16_t queue, struct rte_mbuf **pkts, uint16_t n)
{
    return rte_eth_tx_prepare(port, queue, pkts, n);
}

int itgt_alloc_bulk(struct rte_mempool *pool, struct rte_mbuf **pkts, unsigned n)
{
    return rte_pktmbuf_alloc_bulk(pool, pkts, n);
}

void itgt_free(struct rte_mbuf *m) { rte_pktmbuf_free(m); }

void *itgt_data(struct rte_mbuf *m) { return rte_pktmbuf_mtod(m, void *); }
uint16_t itgt_data_len(const struct rte_mbuf *m) { return m->data_len; }
uint32_t itgt_pkt_len(const struct rte_mbuf *m) { return m->pkt_len; }
uint16_t itgt_nb_segs(const struct rte_mbuf *m) { return m->nb_segs; }
struct rte_mbuf *itgt_next(const struct rte_mbuf *m) { return m->next; }
uint16_t itgt_tailroom(const struct rte_mbuf *m) { return rte_pktmbuf_tailroom(m); }

void itgt_set_len(struct rte_mbuf *m, uint16_t len)
{
    m->data_len = len;
    m->pkt_len = len;
}

void itgt_set_tx_offload(struct rte_mbuf *m, uint64_t ol_flags, uint16_t l2, uint16_t l3, uint16_t l4,
                         uint16_t tso_segsz)
{
    m->ol_flags |= ol_flags;
    m->l2_len = l2;
    m->l3_len = l3;
    m->l4_len = l4;
    m->tso_segsz = tso_segsz;
}

uint64_t itgt_ol_flags(const struct rte_mbuf *m) { return m->ol_flags; }

uint64_t itgt_const(int which)
{
    switch (which) {
    case 0: return RTE_MBUF_F_TX_IPV4;
    case 1: return RTE_MBUF_F_TX_IPV6;
    case 2: return RTE_MBUF_F_TX_IP_CKSUM;
    case 3: return RTE_MBUF_F_TX_TCP_CKSUM;
    case 4: return RTE_MBUF_F_TX_TCP_SEG;
    case 5: return RTE_MBUF_F_RX_L4_CKSUM_MASK;
    case 6: return RTE_MBUF_F_RX_L4_CKSUM_GOOD;
    case 7: return RTE_MBUF_F_RX_L4_CKSUM_BAD;
    case 8: return RTE_MBUF_F_RX_IP_CKSUM_MASK;
    case 9: return RTE_MBUF_F_RX_IP_CKSUM_BAD;
    case 10: return RTE_ETH_TX_OFFLOAD_IPV4_CKSUM;
    case 11: return RTE_ETH_TX_OFFLOAD_TCP_CKSUM;
    case 12: return RTE_ETH_TX_OFFLOAD_TCP_TSO;
    case 13: return RTE_ETH_TX_OFFLOAD_MULTI_SEGS;
    case 14: return RTE_ETH_RX_OFFLOAD_TCP_CKSUM;
    case 15: return RTE_ETH_RX_OFFLOAD_IPV4_CKSUM;
    case 16: return RTE_ETH_RSS_IP;
    case 17: return RTE_ETH_RSS_TCP;
    case 18: return RTE_MBUF_DEFAULT_BUF_SIZE;
    case 19: return RTE_PKTMBUF_HEADROOM;
    case 20: return LCORE_ID_ANY;
    case 21: return RTE_ETH_MQ_RX_RSS;
    case 22: return RTE_ETH_MQ_RX_NONE;
    case 23: return RTE_ETH_TX_OFFLOAD_MBUF_FAST_FREE;
    default: return 0;
    }
}
