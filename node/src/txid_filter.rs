//! A Bloom filter of the txids a shard holds. A resolving shard checks its pending inputs against the
//! filters of the earlier shards and sends each input only to those that may hold its coin, nearest
//! first, instead of walking back through every earlier shard: with coins of any age, that walk grew with
//! the number of shards (an input spending a coin k shards back was sent, and looked up, k times).
//!
//! A filter is only a hint. One that wrongly rules a shard out (out of date after a reorg, or a shard
//! that lied) can only leave an input unrouted, and unrouted inputs walk back through every earlier shard
//! as before; a false positive costs one wasted lookup.

use chainidx_core::schema::KEY_HASH_LEN;
use chainidx_proto as pb;

/// 12 bits and 8 probes per tx: ~0.3% false positives, 1.5 bytes per tx held in the filter.
pub const BITS_PER_TX: usize = 12;
pub const PROBES: u32 = 8;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TxidFilter {
    words: Vec<u64>,
    probes: u32,
}

impl TxidFilter {
    /// An empty filter sized for `txs` txids.
    pub fn with_capacity(txs: usize) -> TxidFilter {
        let bits = (txs * BITS_PER_TX).max(64);
        TxidFilter {
            words: vec![0; bits.div_ceil(64)],
            probes: PROBES,
        }
    }

    /// `key`: the txid's first [`KEY_HASH_LEN`] bytes (internal byte order), as in the `txs` rows.
    pub fn insert(&mut self, key: &[u8; KEY_HASH_LEN]) {
        let bits = self.bits();
        for bit in probe_bits(key, self.probes, bits) {
            self.words[bit / 64] |= 1 << (bit % 64);
        }
    }

    pub fn may_contain(&self, key: &[u8; KEY_HASH_LEN]) -> bool {
        let bits = self.bits();
        probe_bits(key, self.probes, bits).all(|bit| self.words[bit / 64] & (1 << (bit % 64)) != 0)
    }

    fn bits(&self) -> u64 {
        self.words.len() as u64 * 64
    }

    /// Bytes this filter occupies.
    pub fn size_bytes(&self) -> usize {
        self.words.len() * 8
    }

    pub fn to_proto(&self, shard_id: u32) -> pb::TxidFilterReply {
        let mut bits = Vec::with_capacity(self.size_bytes());
        for word in &self.words {
            bits.extend_from_slice(&word.to_le_bytes());
        }
        pb::TxidFilterReply {
            shard_id,
            probes: self.probes,
            bits,
        }
    }

    /// Refuses a malformed filter rather than routing by it.
    pub fn from_proto(reply: &pb::TxidFilterReply) -> Result<TxidFilter, String> {
        if reply.bits.is_empty() || !reply.bits.len().is_multiple_of(8) {
            return Err(format!(
                "a txid filter of {} bytes (a positive multiple of 8 expected)",
                reply.bits.len()
            ));
        }
        if !(1..=32).contains(&reply.probes) {
            return Err(format!("a txid filter with {} probes", reply.probes));
        }
        let words = reply
            .bits
            .chunks_exact(8)
            .map(|w| u64::from_le_bytes(w.try_into().expect("8 bytes")))
            .collect();
        Ok(TxidFilter {
            words,
            probes: reply.probes,
        })
    }
}

/// Txids are uniformly random, so their own bytes are the hashes: double hashing over the first 8 bytes
/// and a 64-bit spread of the next 4, each probe mapped onto the bits by multiply-shift.
fn probe_bits(key: &[u8; KEY_HASH_LEN], probes: u32, bits: u64) -> impl Iterator<Item = usize> {
    let base = u64::from_le_bytes(key[..8].try_into().expect("8 bytes"));
    let step = (u64::from(u32::from_le_bytes(key[8..12].try_into().expect("4 bytes")))
        .wrapping_mul(0x9E37_79B9_7F4A_7C15))
        | 1;
    (0..u64::from(probes)).map(move |i| {
        let hash = base.wrapping_add(i.wrapping_mul(step));
        ((u128::from(hash) * u128::from(bits)) >> 64) as usize
    })
}

/// The nearest shard at or after `from` (in a nearest-first list of earlier shards) whose filter may
/// hold `key`; a shard without a filter may hold anything.
pub fn next_candidate(
    filters: &[Option<std::sync::Arc<TxidFilter>>],
    from: usize,
    key: &[u8; KEY_HASH_LEN],
) -> Option<usize> {
    (from..filters.len()).find(|&j| filters[j].as_ref().is_none_or(|f| f.may_contain(key)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use bitcoin::hashes::{Hash, sha256d};
    use std::sync::Arc;

    fn key(i: u64) -> [u8; KEY_HASH_LEN] {
        let hash = sha256d::Hash::hash(&i.to_le_bytes()).to_byte_array();
        hash[..KEY_HASH_LEN].try_into().unwrap()
    }

    #[test]
    fn every_inserted_txid_is_found_and_few_others_are() {
        let mut filter = TxidFilter::with_capacity(50_000);
        for i in 0..50_000 {
            filter.insert(&key(i));
        }
        assert!((0..50_000).all(|i| filter.may_contain(&key(i))));
        let false_positives = (50_000..250_000)
            .filter(|&i| filter.may_contain(&key(i)))
            .count();
        // ~0.3% expected of 200,000: 600.
        assert!(
            (200..1_500).contains(&false_positives),
            "{false_positives} false positives of 200,000"
        );
        assert_eq!(filter.size_bytes(), 50_000 * BITS_PER_TX / 8);
    }

    #[test]
    fn a_filter_survives_the_wire_and_a_malformed_one_is_refused() {
        let mut filter = TxidFilter::with_capacity(1_000);
        (0..1_000).for_each(|i| filter.insert(&key(i)));
        let wire = filter.to_proto(7);
        assert_eq!(wire.shard_id, 7);
        assert_eq!(TxidFilter::from_proto(&wire).unwrap(), filter);
        let mut short = wire.clone();
        short.bits.pop();
        assert!(TxidFilter::from_proto(&short).is_err());
        let mut no_probes = wire;
        no_probes.probes = 0;
        assert!(TxidFilter::from_proto(&no_probes).is_err());
    }

    #[test]
    fn an_input_goes_to_the_nearest_shard_that_may_hold_its_coin() {
        let mut nearest = TxidFilter::with_capacity(10);
        nearest.insert(&key(1));
        let mut older = TxidFilter::with_capacity(10);
        older.insert(&key(1));
        older.insert(&key(2));
        let filters = vec![Some(Arc::new(nearest)), None, Some(Arc::new(older))];
        assert_eq!(next_candidate(&filters, 0, &key(1)), Some(0));
        // Not held where the filter pointed (a false positive): on to the next that may hold it.
        assert_eq!(next_candidate(&filters, 1, &key(1)), Some(1));
        assert_eq!(next_candidate(&filters, 2, &key(1)), Some(2));
        // A shard without a filter is asked about everything.
        assert_eq!(next_candidate(&filters, 0, &key(2)), Some(1));
        assert_eq!(next_candidate(&filters, 2, &key(3)), None);
    }
}
