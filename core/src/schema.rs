//! Column families and row keys of a shard database. `doc/schema.md` is the prose version of this file;
//! change both together and bump [`FORMAT_VERSION`] when an existing database could be misread.
//!
//! Keys are fixed-width and big-endian so that RocksDB's byte order is height order. Txids and block hashes
//! are stored in rust-bitcoin's internal byte order (the reverse of how they are displayed).

/// Bumped whenever a row layout changes; a database of another version is refused, never misread.
pub const FORMAT_VERSION: u32 = 10;

use crate::spent_script::{Commitment, Template};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Cf {
    /// `b"shard"` → `ShardState` (format version, range, checkpoint).
    Meta,
    /// height → `BlockMeta`.
    Headers,
    /// block hash → height.
    BlockHashes,
    /// height ‖ position of a row's first tx (a multiple of 64) → that tx's offset, then per tx in block
    /// order: txid check (4) ‖ length (3): where each tx's bytes are in its block.
    TxPositions,
    /// txid key → height ‖ position.
    Txs,
    /// [`coin_key`] (height ‖ position ‖ vout) → whole txid ‖ coin (varint value ‖ script); every output but
    /// OP_RETURN not spent in the window that created it.
    Outputs,
    /// [`coin_key`] → spender height ‖ position ‖ vin (varints); in the shard that *created* the output.
    Outspends,
    /// spender height ‖ position ‖ vin → coin it spends (varint value·8 + template tag ‖ script unless the
    /// input rebuilds it, [`encode_prevout`]); in the spender's shard.
    Prevouts,
    /// height ‖ position ‖ vin → prev txid ‖ prev vout ‖ spender txid ‖ the input's script commitment ‖
    /// address keys the tx already counts; inputs awaiting cross-shard resolution.
    Pending,
    /// height ‖ position ‖ vin → prev txid ‖ prev vout ‖ spender txid ‖ creating height; inputs already
    /// attributed from undo data whose owner shard must still record the spend.
    Notices,
    /// address key ‖ height ‖ position → the vouts paying the address ([`encode_funding_vouts`]; amounts
    /// are in `outputs` and `prevouts`);
    /// and the address's stats row, [`stats_key`] → `AddressStats` for this shard. Beside its history rows
    /// the stats row's key costs almost nothing (RocksDB stores the bytes a key shares with the one before
    /// it once); in a column family of its own its 12 random bytes took a third of its 63 bytes per tx.
    History,
    /// Coordinator database only: Raft log index (8) → openraft entry (JSON).
    RaftLog,
}

impl Cf {
    pub const ALL: [Cf; 12] = [
        Cf::Meta,
        Cf::Headers,
        Cf::BlockHashes,
        Cf::TxPositions,
        Cf::Txs,
        Cf::Outputs,
        Cf::Outspends,
        Cf::Prevouts,
        Cf::Pending,
        Cf::Notices,
        Cf::History,
        Cf::RaftLog,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Cf::Meta => "meta",
            Cf::Headers => "headers",
            Cf::BlockHashes => "block_hashes",
            Cf::TxPositions => "tx_positions",
            Cf::Txs => "txs",
            Cf::Outputs => "outputs",
            Cf::Outspends => "outspends",
            Cf::Prevouts => "prevouts",
            Cf::Pending => "pending",
            Cf::Notices => "notices",
            Cf::History => "history",
            Cf::RaftLog => "raft_log",
        }
    }
}

pub const SHARD_STATE_KEY: &[u8] = b"shard";

/// Present from a shard's creation until it first drops spent coins' `outputs` rows
/// (`drop_spent_outputs`): while it is, an `outputs` miss means "not this shard's coin", and a resolution
/// need not also look in `outspends` for a coin whose row was dropped. A database from before this key
/// lacks it and always looks, as it did.
pub const ALL_COIN_ROWS_KEY: &[u8] = b"all_coin_rows";

pub type Hash32 = [u8; 32];

pub fn height_key(height: u32) -> [u8; 4] {
    height.to_be_bytes()
}

#[inline]
pub fn position_key(height: u32, position: u32) -> [u8; 8] {
    let mut key = [0u8; 8];
    key[..4].copy_from_slice(&height.to_be_bytes());
    key[4..].copy_from_slice(&position.to_be_bytes());
    key
}

/// Bytes of a txid a `tx_positions` slot keeps: a check that the body read back from the source at that
/// place is the tx indexed there (a source whose blocks changed under the index fails loudly). Not a
/// key: nothing is looked up by it, so 4 bytes (one wrong body in 4 billion passes) rather than 12.
pub const TXID_CHECK_LEN: usize = 4;

/// Bytes per tx in a `tx_positions` row: its txid check (4) and its length in bytes (3, big-endian; a tx
/// cannot exceed a block's 4 MB).
pub const TX_SLOT_LEN: usize = TXID_CHECK_LEN + 3;

/// Txs per `tx_positions` row: one row per tx cost ~10 bytes of framing each, one per block would make a
/// query read a whole block's row to find one tx.
pub const TXS_PER_SLOT_ROW: u32 = 64;

/// Where a tx is inside its block, from its `tx_positions` row.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TxSlot {
    /// The first [`TXID_CHECK_LEN`] bytes of the tx's txid.
    pub txid_check: [u8; TXID_CHECK_LEN],
    pub offset: u32,
    pub len: u32,
}

/// Key of the `tx_positions` row holding the tx at (height, position): the row's first position.
pub fn tx_slots_key(height: u32, position: u32) -> [u8; 8] {
    position_key(height, position - position % TXS_PER_SLOT_ROW)
}

/// Value of a `tx_positions` row: the byte offset in the block of its first tx (4), then a slot per tx in
/// block order. The full txids are not kept: a query that needs one reads the tx's body (the source has
/// it) and hashes it.
pub fn encode_tx_slots<'a>(
    first_offset: u32,
    txs: impl IntoIterator<Item = (&'a Hash32, usize)>,
) -> Vec<u8> {
    let mut value = first_offset.to_be_bytes().to_vec();
    for (txid, len) in txs {
        assert!(len < 1 << 24, "a tx of {len} bytes does not fit in a block");
        value.extend_from_slice(&txid[..TXID_CHECK_LEN]);
        value.extend_from_slice(&(len as u32).to_be_bytes()[1..]);
    }
    value
}

/// The slot of the tx at `position` in its row's `value`; `None` if the row has no such tx or is malformed.
pub fn tx_slot(value: &[u8], position: u32) -> Option<TxSlot> {
    if value.len() < 4 || !(value.len() - 4).is_multiple_of(TX_SLOT_LEN) {
        return None;
    }
    let slots = &value[4..];
    let index = (position % TXS_PER_SLOT_ROW) as usize;
    if index >= slots.len() / TX_SLOT_LEN {
        return None;
    }
    let len_at = |i: usize| {
        let slot = &slots[i * TX_SLOT_LEN..][..TX_SLOT_LEN];
        let len = &slot[TXID_CHECK_LEN..];
        u32::from_be_bytes([0, len[0], len[1], len[2]])
    };
    Some(TxSlot {
        txid_check: slots[index * TX_SLOT_LEN..][..TXID_CHECK_LEN]
            .try_into()
            .expect("4 bytes"),
        offset: be_u32(&value[..4]) + (0..index).map(len_at).sum::<u32>(),
        len: len_at(index),
    })
}

/// Bytes of a txid or scripthash kept in keys. Both are uniformly random, so 12 bytes (96 bits) collide
/// with probability ~n²/2⁹⁷: about 10⁻¹¹ for the whole chain's 1.2 billion txs or addresses. The full 32
/// bytes cost 20 more bytes in every row (a third of the index); a tx read back is checked against its
/// full txid anyway.
pub const KEY_HASH_LEN: usize = 12;

/// A txid as it appears in keys (`txs`, and `pending` rows' batches of them on the wire).
#[inline]
pub fn txid_key(txid: &Hash32) -> [u8; KEY_HASH_LEN] {
    txid[..KEY_HASH_LEN].try_into().expect("12 bytes")
}

/// A scripthash as it appears in keys (`history` rows and stats rows).
#[inline]
pub fn addr_key(scripthash: &Hash32) -> [u8; KEY_HASH_LEN] {
    scripthash[..KEY_HASH_LEN].try_into().expect("12 bytes")
}

/// Key of an address's stats row in `history`: the address key alone, so it sorts just before the
/// address's history rows (which [`parse_history_key`] tells apart by length) and shares their prefix.
pub fn stats_key(scripthash: &Hash32) -> [u8; KEY_HASH_LEN] {
    addr_key(scripthash)
}

/// Column families that existed in earlier formats and are no longer written: opened (empty or not) so
/// that a database of an older format opens far enough to be refused by its version, and a coordinator's
/// Raft database, which has every column family, keeps opening.
pub const RETIRED_CFS: &[&str] = &["stats"];

/// Key of a coin's `outputs` and `outspends` rows: where it is, (height, position) of its tx ‖ vout, in the
/// shard that created it. By place rather than by txid key: rows follow block order, consecutive ones
/// share most of their key (`outspends` 30.8 → 17.2 bytes per tx on the generated chain), and
/// `tx_positions` needs no txid key to find a history row's coins. A coin asked for by outpoint is found
/// through `txs` first.
#[inline]
pub fn coin_key(height: u32, position: u32, vout: u32) -> [u8; 12] {
    pending_key(height, position, vout)
}

#[inline]
pub fn pending_key(height: u32, position: u32, vin: u32) -> [u8; 12] {
    let mut key = [0u8; 12];
    key[..8].copy_from_slice(&position_key(height, position));
    key[8..].copy_from_slice(&vin.to_be_bytes());
    key
}

pub const HISTORY_KEY_LEN: usize = KEY_HASH_LEN + 8;

/// Key of an address's history row for the tx at (height, position): one row per (address, tx), however
/// many of the tx's inputs and outputs touch the address (5.28 rows per tx on the generated chain became
/// 5.05: most inputs and outputs of a tx touch distinct addresses). Its value lists the outputs that fund the address ([`encode_funding_vouts`]); which inputs spend
/// from it is in the tx's body and `prevouts`.
#[inline]
pub fn history_key(scripthash: &Hash32, height: u32, position: u32) -> [u8; HISTORY_KEY_LEN] {
    let mut key = [0u8; HISTORY_KEY_LEN];
    key[..KEY_HASH_LEN].copy_from_slice(&addr_key(scripthash));
    key[KEY_HASH_LEN..].copy_from_slice(&position_key(height, position));
    key
}

/// (height, position) of a history row's key; `None` for the address's stats row (the address key alone)
/// or anything else that is not a history key.
pub fn parse_history_key(key: &[u8]) -> Option<(u32, u32)> {
    if key.len() != HISTORY_KEY_LEN {
        return None;
    }
    let rest = &key[KEY_HASH_LEN..];
    Some((be_u32(&rest[0..4]), be_u32(&rest[4..8])))
}

/// Value of a history row: the vouts of the tx's outputs paying the address, ascending, each a LEB128
/// varint of its distance from the one before (the first from -1): one byte for most rows. Empty where
/// the tx only spends from the address.
/// Written into `out` (cleared first), which the caller keeps from one row to the next: a window builds
/// one per (address, tx).
pub fn encode_funding_vouts(vouts: &[u32], out: &mut Vec<u8>) {
    out.clear();
    let mut next = 0u64;
    for &vout in vouts {
        let vout = u64::from(vout);
        debug_assert!(vout >= next, "funding vouts ascend");
        push_varint(out, vout - next);
        next = vout + 1;
    }
}

/// The vouts of an [`encode_funding_vouts`] value; `None` if it is malformed.
pub fn decode_funding_vouts(mut bytes: &[u8]) -> Option<Vec<u32>> {
    let mut vouts = Vec::new();
    let mut next = 0u64;
    while !bytes.is_empty() {
        let (gap, rest) = decode_varint(bytes)?;
        let vout = u32::try_from(next.checked_add(gap)?).ok()?;
        vouts.push(vout);
        next = u64::from(vout) + 1;
        bytes = rest;
    }
    Some(vouts)
}

/// A coin as `outputs` (and an escaped `prevouts` value) keep it: its amount as a LEB128 varint, then its
/// script (the rest of the value). A protobuf `TxOut` spent 4 more bytes per coin on field tags and lengths.
fn push_coin(out: &mut Vec<u8>, value: u64, script: &[u8]) {
    push_varint(out, value);
    out.extend_from_slice(script);
}

fn push_varint(out: &mut Vec<u8>, value: u64) {
    let mut bytes = [0u8; 10];
    let len = write_varint(&mut bytes, value);
    out.extend_from_slice(&bytes[..len]);
}

/// `value` as a LEB128 varint at the start of `out` (room for 10 bytes, or 5 for a `u32`); its length.
fn write_varint(out: &mut [u8], value: u64) -> usize {
    let mut rest = value;
    let mut len = 0;
    while rest >= 0x80 {
        out[len] = (rest as u8) | 0x80;
        len += 1;
        rest >>= 7;
    }
    out[len] = rest as u8;
    len + 1
}

/// A LEB128 varint and the bytes after it; `None` if it is unterminated or longer than 10 bytes.
fn decode_varint(bytes: &[u8]) -> Option<(u64, &[u8])> {
    let mut value = 0u64;
    for (i, byte) in bytes.iter().enumerate().take(10) {
        if i == 9 && *byte > 1 {
            return None; // past 64 bits
        }
        value |= u64::from(byte & 0x7f).checked_shl(7 * i as u32)?;
        if byte & 0x80 == 0 {
            return Some((value, &bytes[i + 1..]));
        }
    }
    None
}

/// How a `prevouts` row gives the spent coin's script.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SpentScript<'a> {
    /// Kept whole: the spending input's data does not rebuild it.
    Whole(&'a [u8]),
    /// Rebuilt from the spending input (`spent_script::rebuild`).
    Rebuilt(Template),
}

/// Tag of a `prevouts` value whose amount did not fit beside the tag: the amount follows as a varint of
/// its own, then the whole script. No real amount needs it (21M BTC < 2⁵¹ sat).
const PREVOUT_WIDE_AMOUNT: u64 = 7;

/// Value of a `prevouts` row: a LEB128 varint of amount·8 + tag, then the script if the tag is 0. A tag of
/// 1–4 is the [`Template`] under which the spending input rebuilds the script (checked when written), so
/// ~85% of inputs keep no script bytes here. The tag costs no byte of its own below 2⁶¹ sat.
pub fn encode_prevout(value: u64, template: Option<Template>, script: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(10 + script.len());
    let tag = template.map_or(0, |t| u64::from(t.tag()));
    if value >> 61 == 0 {
        push_varint(&mut out, (value << 3) | tag);
        if template.is_none() {
            out.extend_from_slice(script);
        }
    } else {
        push_varint(&mut out, PREVOUT_WIDE_AMOUNT);
        push_coin(&mut out, value, script);
    }
    out
}

/// (amount, script) of an [`encode_prevout`] value; `None` if it is malformed.
pub fn decode_prevout(bytes: &[u8]) -> Option<(u64, SpentScript<'_>)> {
    let (head, rest) = decode_varint(bytes)?;
    match head & 7 {
        0 => Some((head >> 3, SpentScript::Whole(rest))),
        PREVOUT_WIDE_AMOUNT if head == PREVOUT_WIDE_AMOUNT => {
            let (value, script) = decode_varint(rest)?;
            Some((value, SpentScript::Whole(script)))
        }
        tag => {
            let template = Template::from_tag(tag as u8)?;
            rest.is_empty()
                .then_some((head >> 3, SpentScript::Rebuilt(template)))
        }
    }
}

/// Value of an `outputs` row: the coin's whole txid, then the coin. The key says where the coin is, not
/// whose it is: a reader that found the place by a txid key compares the whole txid, so a tx whose txid
/// shares the 12-byte key (ground on purpose, ~2⁴⁸ work) is never taken for another, and a UTXO answer
/// has its txid without reading the tx.
pub fn encode_output(txid: &Hash32, value: u64, script: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(32 + 10 + script.len());
    out.extend_from_slice(txid);
    push_coin(&mut out, value, script);
    out
}

/// (txid, value, script) of an [`encode_output`] value.
pub fn decode_output(bytes: &[u8]) -> Option<(&Hash32, u64, &[u8])> {
    let (txid, coin) = bytes.split_first_chunk::<32>()?;
    let (value, script) = decode_varint(coin)?;
    Some((txid, value, script))
}

/// Value of an `outspends` row: where the spending input is, which is also its `prevouts` key in the
/// spender's shard. Not its txid: ~5 bytes instead of 40 (outspends were the largest column family); a
/// query asks the spender's shard for the txid at that position ([`SpentBy`] → `Worker.TxidsAt`).
/// Height, position and vin as three LEB128 varints (5–6 bytes for most spends against 12 fixed).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SpentBy {
    pub height: u32,
    pub position: u32,
    pub vin: u32,
}

impl SpentBy {
    /// On the stack: an `outspends` value is built per spent coin.
    pub fn encode(&self) -> SpentByBytes {
        let mut out = SpentByBytes {
            bytes: [0; 15],
            len: 0,
        };
        for part in [self.height, self.position, self.vin] {
            out.len += write_varint(&mut out.bytes[out.len..], u64::from(part));
        }
        out
    }

    /// `None` unless `value` is exactly three varints that each fit in 32 bits.
    pub fn decode(value: &[u8]) -> Option<SpentBy> {
        fn part(bytes: &[u8]) -> Option<(u32, &[u8])> {
            let (n, rest) = decode_varint(bytes)?;
            Some((u32::try_from(n).ok()?, rest))
        }
        let (height, rest) = part(value)?;
        let (position, rest) = part(rest)?;
        let (vin, rest) = part(rest)?;
        rest.is_empty().then_some(SpentBy {
            height,
            position,
            vin,
        })
    }
}

/// An encoded [`SpentBy`]: three varints of at most 5 bytes each.
#[derive(Clone, Copy, Debug)]
pub struct SpentByBytes {
    bytes: [u8; 15],
    len: usize,
}

impl AsRef<[u8]> for SpentByBytes {
    fn as_ref(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

/// Value of a `pending` row: the outpoint an input spends and the spending txid.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PendingInput {
    pub prev_txid: Hash32,
    pub prev_vout: u32,
    pub spender_txid: Hash32,
}

impl PendingInput {
    pub fn encode(&self) -> [u8; 68] {
        let mut value = [0u8; 68];
        value[..32].copy_from_slice(&self.prev_txid);
        value[32..36].copy_from_slice(&self.prev_vout.to_be_bytes());
        value[36..].copy_from_slice(&self.spender_txid);
        value
    }

    pub fn decode(value: &[u8]) -> Option<PendingInput> {
        (value.len() == 68).then(|| PendingInput {
            prev_txid: value[..32].try_into().expect("32 bytes"),
            prev_vout: be_u32(&value[32..36]),
            spender_txid: value[36..].try_into().expect("32 bytes"),
        })
    }
}

/// A decoded `pending` row.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PendingRow {
    pub input: PendingInput,
    /// What the input's data commits its coin's script to (`spent_script::commitment`), so that phase 2
    /// can write the coin's `prevouts` row without its script, as phase 1 does, without the tx's body.
    pub commitment: Option<Commitment>,
    /// Address keys whose `tx_count` already counts the spending tx.
    pub counted: Vec<[u8; KEY_HASH_LEN]>,
}

/// A `pending` row's value: the input; its commitment (kind 0 none, 1 HASH160 ‖ 20 bytes, 2 SHA256 ‖ 32
/// bytes); then the address keys its tx already counts in `tx_count` from phase 1 (its outputs' and its
/// attributed inputs' addresses), so that phase 2 counts the tx once per address without reading
/// `history` back.
pub fn encode_pending(
    input: &PendingInput,
    commitment: Option<&Commitment>,
    counted: &[[u8; KEY_HASH_LEN]],
) -> Vec<u8> {
    let mut value = Vec::with_capacity(68 + 33 + KEY_HASH_LEN * counted.len());
    value.extend_from_slice(&input.encode());
    match commitment {
        None => value.push(0),
        Some(Commitment::Hash160(hash)) => {
            value.push(1);
            value.extend_from_slice(hash);
        }
        Some(Commitment::Sha256(hash)) => {
            value.push(2);
            value.extend_from_slice(hash);
        }
    }
    for key in counted {
        value.extend_from_slice(key);
    }
    value
}

pub fn decode_pending(value: &[u8]) -> Option<PendingRow> {
    let (input, rest) = value.split_at_checked(68)?;
    let (kind, rest) = rest.split_first()?;
    let (commitment, rest) = match kind {
        0 => (None, rest),
        1 => {
            let (hash, rest) = rest.split_first_chunk::<20>()?;
            (Some(Commitment::Hash160(*hash)), rest)
        }
        2 => {
            let (hash, rest) = rest.split_first_chunk::<32>()?;
            (Some(Commitment::Sha256(*hash)), rest)
        }
        _ => return None,
    };
    if !rest.len().is_multiple_of(KEY_HASH_LEN) {
        return None;
    }
    let counted = rest
        .chunks_exact(KEY_HASH_LEN)
        .map(|key| key.try_into().expect("12 bytes"))
        .collect();
    Some(PendingRow {
        input: PendingInput::decode(input)?,
        commitment,
        counted,
    })
}

pub fn be_u32(bytes: &[u8]) -> u32 {
    u32::from_be_bytes(bytes[..4].try_into().expect("4 bytes"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn history_keys_sort_by_height_then_position_after_the_stats_row() {
        let sh = [7u8; 32];
        let a = history_key(&sh, 9, 300);
        let b = history_key(&sh, 10, 0);
        assert!(stats_key(&sh).as_slice() < a.as_slice() && a < b);
        assert_eq!(parse_history_key(&a), Some((9, 300)));
        assert_eq!(parse_history_key(&stats_key(&sh)), None);
    }

    #[test]
    fn funding_vouts_round_trip_as_gaps() {
        for vouts in [
            vec![],
            vec![0],
            vec![5],
            vec![0, 1, 2],
            vec![3, 200, 70_000],
            vec![u32::MAX],
        ] {
            let mut bytes = vec![9; 3]; // left over from another row
            encode_funding_vouts(&vouts, &mut bytes);
            assert_eq!(
                decode_funding_vouts(&bytes),
                Some(vouts.clone()),
                "{vouts:?}"
            );
        }
        let encoded = |vouts: &[u32]| {
            let mut out = Vec::new();
            encode_funding_vouts(vouts, &mut out);
            out
        };
        assert_eq!(encoded(&[0]), [0]);
        assert_eq!(encoded(&[1, 2]), [1, 0]);
        // Unterminated, or past u32.
        assert_eq!(decode_funding_vouts(&[0x80]), None);
        assert_eq!(
            decode_funding_vouts(&[0xff, 0xff, 0xff, 0xff, 0x0f, 0]),
            None
        );
    }

    #[test]
    fn coins_round_trip_with_varint_amounts() {
        let script = [0x00, 0x14, 7, 7, 7];
        for value in [
            0,
            1,
            127,
            128,
            546,
            100_000_000,
            21_000_000 * 100_000_000,
            u64::MAX,
        ] {
            let mut bytes = Vec::new();
            push_coin(&mut bytes, value, &script);
            assert_eq!(
                decode_varint(&bytes),
                Some((value, script.as_slice())),
                "{value}"
            );
        }
        let mut bytes = Vec::new();
        push_coin(&mut bytes, 100_000, &[]);
        assert_eq!(bytes.len(), 3);
        assert_eq!(decode_varint(&[0x80]), None, "unterminated");
        assert_eq!(decode_varint(&[0xff; 11]), None, "longer than 10 bytes");
        assert_eq!(
            decode_varint(&[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02]),
            None,
            "past 64 bits"
        );
        assert_eq!(decode_varint(&[]), None);
    }

    #[test]
    fn prevouts_keep_a_template_tag_or_the_whole_script() {
        let script = [0x51, 0x20, 9, 9];
        for value in [0, 546, 21_000_000 * 100_000_000, (1 << 61) - 1] {
            let whole = encode_prevout(value, None, &script);
            assert_eq!(
                decode_prevout(&whole),
                Some((value, SpentScript::Whole(script.as_slice())))
            );
            let tagged = encode_prevout(value, Some(Template::P2wsh), &script);
            assert_eq!(
                decode_prevout(&tagged),
                Some((value, SpentScript::Rebuilt(Template::P2wsh)))
            );
            assert_eq!(tagged.len(), whole.len() - script.len(), "the tag is free");
        }
        // Amounts past 2^61 sat (none real) keep their own varint and the whole script.
        for value in [1 << 61, u64::MAX] {
            let bytes = encode_prevout(value, Some(Template::P2pkh), &script);
            assert_eq!(
                decode_prevout(&bytes),
                Some((value, SpentScript::Whole(script.as_slice())))
            );
        }
        assert_eq!(encode_prevout(0, None, &[]), [0]);
        assert_eq!(decode_prevout(&[5]), None, "unknown tag");
        assert_eq!(
            decode_prevout(&[(1 << 3) | 7]),
            None,
            "wide tag with an amount"
        );
        assert_eq!(decode_prevout(&[1, 0x51]), None, "a tag and a script");
        assert_eq!(decode_prevout(&[0x80]), None, "unterminated");
    }

    #[test]
    fn outputs_keep_their_whole_txid() {
        let mut txid = [0u8; 32];
        txid.iter_mut().enumerate().for_each(|(i, b)| *b = i as u8);
        let bytes = encode_output(&txid, 546, &[0x51]);
        assert_eq!(decode_output(&bytes), Some((&txid, 546, [0x51].as_slice())));
        assert_eq!(decode_output(&bytes[..32]), None, "no amount");
        assert_eq!(decode_output(&bytes[..19]), None);
    }

    #[test]
    fn values_round_trip() {
        for (height, position, vin) in [
            (77, 9, 3),
            (0, 0, 0),
            (900_000, 4_000, 300),
            (u32::MAX, 1, 2),
        ] {
            let spent = SpentBy {
                height,
                position,
                vin,
            };
            assert_eq!(SpentBy::decode(spent.encode().as_ref()), Some(spent));
        }
        assert_eq!(
            SpentBy {
                height: 900_000,
                position: 4_000,
                vin: 1
            }
            .encode()
            .as_ref()
            .len(),
            6
        );
        let pending = PendingInput {
            prev_txid: [2; 32],
            prev_vout: 5,
            spender_txid: [3; 32],
        };
        assert_eq!(PendingInput::decode(&pending.encode()), Some(pending));
        let counted = vec![[8u8; KEY_HASH_LEN], [9u8; KEY_HASH_LEN]];
        for commitment in [
            None,
            Some(Commitment::Hash160([4; 20])),
            Some(Commitment::Sha256([5; 32])),
        ] {
            let row = PendingRow {
                input: pending,
                commitment,
                counted: counted.clone(),
            };
            let bytes = encode_pending(&pending, commitment.as_ref(), &counted);
            assert_eq!(decode_pending(&bytes), Some(row));
            assert_eq!(decode_pending(&bytes[..bytes.len() - 1]), None);
        }
        assert_eq!(
            decode_pending(&encode_pending(&pending, None, &[]).as_slice()[..68]),
            None
        );
        assert_eq!(
            decode_pending(&[encode_pending(&pending, None, &[]), vec![1]].concat()),
            None
        );
        let mut unknown_kind = encode_pending(&pending, None, &[]);
        unknown_kind[68] = 3;
        assert_eq!(decode_pending(&unknown_kind), None);
        // Two parts, four parts, an unterminated one, one past 32 bits.
        assert_eq!(SpentBy::decode(&[0u8; 2]), None);
        assert_eq!(SpentBy::decode(&[0u8; 4]), None);
        assert_eq!(SpentBy::decode(&[0, 0, 0x80]), None);
        assert_eq!(SpentBy::decode(&[0, 0, 0x80, 0x80, 0x80, 0x80, 0x10]), None);
    }

    #[test]
    fn a_tx_slot_is_found_from_its_rows_first_offset_and_the_lengths_before_it() {
        let txids = [[1u8; 32], [2u8; 32], [3u8; 32]];
        let value = encode_tx_slots(81, [(&txids[0], 250), (&txids[1], 70_000), (&txids[2], 9)]);
        assert_eq!(value.len(), 4 + 3 * TX_SLOT_LEN);
        assert_eq!(
            tx_slot(&value, 0),
            Some(TxSlot {
                txid_check: [1; 4],
                offset: 81,
                len: 250
            })
        );
        assert_eq!(
            tx_slot(&value, 1).map(|s| (s.offset, s.len)),
            Some((331, 70_000))
        );
        assert_eq!(
            tx_slot(&value, 2).map(|s| (s.txid_check, s.offset)),
            Some(([3; 4], 70_331))
        );
        assert_eq!(tx_slot(&value, 3), None);
        assert_eq!(tx_slot(&value[1..], 0), None);
        // Position 66 is the third slot of the row that starts at 64.
        assert_eq!(tx_slots_key(7, 66), position_key(7, 64));
        assert_eq!(tx_slot(&value, 66).map(|s| s.offset), Some(70_331));
    }
}
