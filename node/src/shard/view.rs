//! The read side of a shard: what queries (and indexing work that reads back its own rows) ask of it.

use super::*;

/// A shard's rows as one query reads them: [`Shard::view`] holds one snapshot for the whole query, so that a
/// block written or rolled back beside it is in all of its reads or in none (a history page's rows, then
/// each tx's place, header and spent coins; a UTXO's `outspends` then `outputs` row). `Shard::live`
/// reads the live rows, for indexing work that must see what was just written.
///
/// A view may also be pinned to a tip height ([`Shard::view_at`]): it then answers as if the shard held
/// no block above it, so that every shard and replica asked by one query answers as of the same block
/// although a new block is being written to some of them (or rolled back) meanwhile.
pub struct ShardView<'a> {
    shard: &'a Shard,
    rows: Rows<'a>,
    tip: Option<u32>,
    /// The shard's state as the snapshot holds it, read when the view is pinned.
    pinned_state: Option<pb::ShardState>,
}

enum Rows<'a> {
    Snapshot(Box<dyn Reads + 'a>),
    Live(&'a dyn Store),
}

impl Shard {
    /// One snapshot of this shard's rows for a whole query ([`ShardView`]).
    pub fn view(&self) -> ShardView<'_> {
        ShardView {
            shard: self,
            rows: Rows::Snapshot(self.store.snapshot()),
            tip: None,
            pinned_state: None,
        }
    }

    /// [`Shard::view`] answering as of block `tip` where given: blocks above it are left out. Refused
    /// ([`ShardError::BehindPinnedTip`]) where the shard no longer holds every block up to the tip: a
    /// rollback is removing them, and the tip is stale (a coordinator that has not applied the lowered
    /// tip its leader committed before the rollback); answering would mix the two branches.
    pub fn view_at(&self, tip: Option<u32>) -> Result<ShardView<'_>, ShardError> {
        let mut view = self.view();
        let Some(tip) = tip else {
            return Ok(view);
        };
        let state = stored_state(view.rows())?.ok_or_else(|| corrupt("shard state", "missing"))?;
        let last_needed = tip.min(state.end_height.saturating_sub(1));
        if state.start_height <= tip && state.next_height <= last_needed {
            return Err(ShardError::BehindPinnedTip {
                shard: self.id,
                next_height: state.next_height,
                tip,
            });
        }
        view.tip = Some(tip);
        view.pinned_state = Some(state);
        Ok(view)
    }

    /// This shard's live rows, read through the same code as queries' views.
    pub(super) fn live(&self) -> ShardView<'_> {
        ShardView {
            shard: self,
            rows: Rows::Live(&*self.store),
            tip: None,
            pinned_state: None,
        }
    }
}

impl ShardView<'_> {
    fn rows(&self) -> &dyn Reads {
        match &self.rows {
            Rows::Snapshot(snapshot) => &**snapshot,
            Rows::Live(store) => *store,
        }
    }

    /// Whether block `height` is above the tip this view answers as of.
    fn above_tip(&self, height: u32) -> bool {
        self.tip.is_some_and(|tip| height > tip)
    }

    /// The tip this view is pinned to, if the snapshot's range reaches past it.
    fn tip_below_end(&self) -> Option<u32> {
        let state = self.pinned_state.as_ref()?;
        self.tip
            .filter(|&tip| state.end_height > tip.saturating_add(1))
    }

    pub(super) fn load_stats(&self, sh: &ScriptHash) -> Result<pb::AddressStats, ShardError> {
        match self.rows().get(Cf::History, &schema::stats_key(sh))? {
            Some(bytes) => {
                pb::AddressStats::decode(bytes.as_slice()).map_err(|e| corrupt("address stats", e))
            }
            None => Ok(pb::AddressStats::default()),
        }
    }

    /// Output `vout` of the tx at (height, position), read from the source, if that tx is `txid`.
    pub(super) fn coin_in_body(
        &self,
        height: u32,
        position: u32,
        txid: &Hash32,
        vout: u32,
    ) -> Result<Option<pb::TxOut>, ShardError> {
        let body = self.tx_body(height, position)?;
        if body.txid != *txid {
            return Ok(None);
        }
        Ok(body
            .tx
            .output
            .get(vout as usize)
            .map(|out| tx_out(out.value.to_sat(), out.script_pubkey.as_bytes())))
    }

    /// The txs of block `height`, in block order, read back from the source by the hash this shard indexed
    /// (so a block a reorg took off the best chain is still found).
    pub(super) fn block_txs(
        &self,
        height: u32,
    ) -> Result<Vec<(u32, Hash32, Transaction)>, ShardError> {
        let meta = self
            .block_meta(height)?
            .ok_or_else(|| corrupt("block", format!("no header at height {height}")))?;
        let hash = block_hash(&meta.hash)?;
        let block: Block = deserialize(&self.shard.source.block_by_hash(&hash)?)
            .map_err(|e| corrupt("block", e))?;
        Ok(block
            .txdata
            .into_iter()
            .enumerate()
            .map(|(position, tx)| (position as u32, tx.compute_txid().to_byte_array(), tx))
            .collect())
    }

    /// The address's totals in this shard; in a pinned view, less what the blocks above the tip added.
    pub fn address_stats(&self, sh: &ScriptHash) -> Result<pb::AddressStats, ShardError> {
        let stats = self.load_stats(sh)?;
        match self.tip_below_end() {
            Some(tip) if stats.tx_count > 0 => subtract(stats, &self.stats_above(sh, tip)?),
            _ => Ok(stats),
        }
    }

    /// The address's history rows as (height, position, funding vouts), scanned from `from` while `keep`
    /// holds for their height.
    fn funding_rows(
        &self,
        sh: &ScriptHash,
        from: ScanFrom<'_>,
        keep: &mut dyn FnMut(u32) -> bool,
    ) -> Result<Vec<(u32, u32, Vec<u32>)>, ShardError> {
        let mut rows = Vec::new();
        let mut malformed = None;
        self.rows()
            .scan(Cf::History, &addr_key(sh), from, &mut |key, value| {
                let Some((height, position)) = parse_history_key(key) else {
                    return true; // the stats row, which sorts first
                };
                if !keep(height) {
                    return false;
                }
                match decode_funding_vouts(value) {
                    Some(vouts) => rows.push((height, position, vouts)),
                    None => {
                        malformed = Some(hex::encode(key));
                        return false;
                    }
                }
                true
            })?;
        match malformed {
            Some(key) => Err(corrupt("history row", key)),
            None => Ok(rows),
        }
    }

    /// What the txs above `tip` added to the address's stats row, counted again the way indexing counts
    /// them: each tx once, each output paying the address (its history row's vouts), each input whose
    /// spent coin pays it (read from the tx's body and its `prevouts` rows). Blocks above a pinned tip
    /// are the few being caught up or rolled back, so this reads a handful of bodies, usually none.
    ///
    /// Only what the stats row holds is counted back out. A bulk write (a restarted catch-up) ingests
    /// rows before the stats that go with them: a window's stats ride with its checkpoint, so rows of
    /// blocks at or past the checkpoint are not in them; a resolution's stats go with the deletion of
    /// its `pending` rows, so an input whose `pending` row is still there is not in them, nor is a tx's
    /// row for an address only such inputs touch (the address is not among those its `pending` rows
    /// say phase 1 counted).
    fn stats_above(&self, sh: &ScriptHash, tip: u32) -> Result<pb::AddressStats, ShardError> {
        let checkpoint = self
            .pinned_state
            .as_ref()
            .map_or(u32::MAX, |s| s.next_height);
        let address = addr_key(sh);
        let above = self.funding_rows(sh, ScanFrom::Last, &mut |height| height > tip)?;
        let mut added = pb::AddressStats::default();
        for (height, position, vouts) in above {
            if height >= checkpoint {
                continue;
            }
            let pending = self.pending_of(height, position)?;
            if let Some((_, row)) = pending.first()
                && !row.counted.contains(&address)
            {
                continue;
            }
            let tx = self.tx_body(height, position)?.tx;
            added.tx_count += 1;
            for vout in vouts {
                let output = tx.output.get(vout as usize).ok_or_else(|| {
                    corrupt(
                        "history row",
                        format!("no output {vout} at {height}:{position}"),
                    )
                })?;
                added.funded_txo_count += 1;
                added.funded_sum += output.value.to_sat();
            }
            let coins = self.spent_coins(height, position, &tx)?;
            for (vin, coin) in (0u32..).zip(coins) {
                let Some(coin) = coin else { continue };
                let attributed = !pending.iter().any(|(pending_vin, _)| *pending_vin == vin);
                // By address key, as the stats row is.
                if attributed
                    && addr_key(&scripthash(bitcoin::Script::from_bytes(&coin.script))) == address
                {
                    added.spent_txo_count += 1;
                    added.spent_sum += coin.value;
                }
            }
        }
        Ok(added)
    }

    /// The `pending` rows (inputs not attributed yet) of the tx at (height, position), by vin.
    fn pending_of(
        &self,
        height: u32,
        position: u32,
    ) -> Result<Vec<(u32, schema::PendingRow)>, ShardError> {
        let mut rows = Vec::new();
        let mut malformed = None;
        let tx_key = schema::position_key(height, position);
        self.rows().scan(
            Cf::Pending,
            &tx_key,
            ScanFrom::First,
            &mut |key, value| match (key.get(8..12), schema::decode_pending(value)) {
                (Some(vin), Some(row)) => {
                    rows.push((schema::be_u32(vin), row));
                    true
                }
                _ => {
                    malformed = Some(hex::encode(key));
                    false
                }
            },
        )?;
        match malformed {
            Some(key) => Err(corrupt("pending", key)),
            None => Ok(rows),
        }
    }

    pub(super) fn block_meta(&self, height: u32) -> Result<Option<pb::BlockMeta>, ShardError> {
        self.rows()
            .get(Cf::Headers, &schema::height_key(height))?
            .map(|bytes| {
                pb::BlockMeta::decode(bytes.as_slice()).map_err(|e| corrupt("block meta", e))
            })
            .transpose()
    }

    pub(super) fn tx_status(&self, height: u32, position: u32) -> Result<pb::TxStatus, ShardError> {
        let meta = self
            .block_meta(height)?
            .ok_or_else(|| corrupt("tx status", format!("no header at height {height}")))?;
        Ok(pb::TxStatus {
            height,
            position,
            block_hash: meta.hash,
            block_time: header_time(&meta.header),
        })
    }

    pub(super) fn slot_at(&self, height: u32, position: u32) -> Result<TxSlot, ShardError> {
        let no_tx = || corrupt("tx position", format!("no tx at {height}:{position}"));
        let bytes = self
            .rows()
            .get(Cf::TxPositions, &schema::tx_slots_key(height, position))?
            .ok_or_else(no_tx)?;
        schema::tx_slot(&bytes, position).ok_or_else(no_tx)
    }

    /// Whether `txid` is one of this shard's txs: then this shard holds its coins. By its 12-byte key only
    /// (a rollback asks this for every input of a block, and reading each coin's tx back from the source
    /// would be a fetch per input): see "Hashes in keys" in doc/schema.md for what grinding can do.
    pub(super) fn holds_tx(&self, txid: &Hash32) -> Result<bool, ShardError> {
        Ok(self.key_position(txid)?.is_some())
    }

    /// Where the tx with `txid`'s 12-byte key is in this shard, if any.
    pub(super) fn key_position(&self, txid: &Hash32) -> Result<Option<(u32, u32)>, ShardError> {
        self.rows()
            .get(Cf::Txs, &txid_key(txid))?
            .map(|bytes| tx_position(&bytes))
            .transpose()
    }

    /// [`Shard::key_position`] of each txid, with one `MultiGet`.
    pub(super) fn key_positions(
        &self,
        txids: &[&Hash32],
    ) -> Result<Vec<Option<(u32, u32)>>, ShardError> {
        let keys: Vec<_> = txids.iter().map(|txid| txid_key(txid)).collect();
        let refs: Vec<&[u8]> = keys.iter().map(|key| key.as_slice()).collect();
        self.rows()
            .multi_get(Cf::Txs, &refs)?
            .into_iter()
            .map(|row| row.map(|bytes| tx_position(&bytes)).transpose())
            .collect()
    }

    /// `txid` in this shard: where it is and its body, read from the source and compared whole (the key
    /// has only 12 bytes of it).
    pub(super) fn find_tx(&self, txid: &Hash32) -> Result<Option<TxBody>, ShardError> {
        let Some((height, position)) = self.key_position(txid)? else {
            return Ok(None);
        };
        let body = self.tx_body(height, position)?;
        Ok((body.txid == *txid).then_some(body))
    }

    /// The tx at (height, position), its bytes read from the source and checked against the stored txid check.
    pub(super) fn tx_body(&self, height: u32, position: u32) -> Result<TxBody, ShardError> {
        let slot = self.slot_at(height, position)?;
        let status = self.tx_status(height, position)?;
        let hash = block_hash(&status.block_hash)?;
        let raw = self
            .shard
            .source
            .block_slice(&hash, slot.offset, slot.len)?;
        let tx: Transaction =
            deserialize(&raw).map_err(|e| corrupt("tx body from the source", e))?;
        let txid = tx.compute_txid().to_byte_array();
        if txid[..schema::TXID_CHECK_LEN] != slot.txid_check {
            return Err(corrupt(
                "tx body from the source",
                format!("block {hash} has another tx at {height}:{position}"),
            ));
        }
        Ok(TxBody {
            height,
            position,
            raw,
            tx,
            txid,
            status,
        })
    }

    pub fn tx(&self, txid: &Hash32) -> Result<Option<pb::TxDetail>, ShardError> {
        match self
            .find_tx(txid)?
            .filter(|body| !self.above_tip(body.height))
        {
            Some(body) => self.tx_detail(body).map(Some),
            None => Ok(None),
        }
    }

    pub(super) fn tx_detail_at(
        &self,
        height: u32,
        position: u32,
    ) -> Result<pb::TxDetail, ShardError> {
        self.tx_detail(self.tx_body(height, position)?)
    }

    /// The coin each input of `tx` (at height, position) spends, where the input is attributed yet. Point
    /// lookups, not a scan: they read only the files whose height range covers them (one, once the shard
    /// is compacted).
    fn spent_coins(
        &self,
        height: u32,
        position: u32,
        tx: &Transaction,
    ) -> Result<Vec<Option<pb::TxOut>>, ShardError> {
        if tx.is_coinbase() {
            return Ok(vec![None; tx.input.len()]);
        }
        let keys: Vec<[u8; 12]> = (0..tx.input.len() as u32)
            .map(|vin| pending_key(height, position, vin))
            .collect();
        let key_refs: Vec<&[u8]> = keys.iter().map(|key| key.as_slice()).collect();
        let values = self.rows().multi_get(Cf::Prevouts, &key_refs)?;
        keys.iter()
            .zip(values)
            .zip(&tx.input)
            .map(|((key, value), input)| value.map(|bytes| prevout(&bytes, key, input)).transpose())
            .collect()
    }

    pub(super) fn tx_detail(&self, body: TxBody) -> Result<pb::TxDetail, ShardError> {
        let TxBody {
            height,
            position,
            raw,
            tx,
            status,
            ..
        } = body;
        // Inputs not yet resolved (shard still in phase 1 or 2) stay empty.
        let prevouts = self
            .spent_coins(height, position, &tx)?
            .into_iter()
            .map(Option::unwrap_or_default)
            .collect();
        Ok(pb::TxDetail {
            raw,
            prevouts,
            status: Some(status),
        })
    }

    /// Distinct txs touching `sh`, newest first, strictly before `before` (height, position) if given.
    pub fn history(
        &self,
        sh: &ScriptHash,
        before: Option<(u32, u32)>,
        limit: usize,
    ) -> Result<Vec<pb::TxDetail>, ShardError> {
        let mut positions: Vec<(u32, u32)> = Vec::new();
        // A pinned view starts below the first tx after its tip.
        let before = match self.tip_below_end() {
            Some(tip) => {
                let first_above = (tip + 1, 0);
                Some(before.map_or(first_above, |cursor| cursor.min(first_above)))
            }
            None => before,
        };
        let start = before.map(|(h, p)| history_key(sh, h, p));
        let from = match &start {
            Some(key) => ScanFrom::AtOrBefore(key),
            None => ScanFrom::Last,
        };
        self.rows()
            .scan(Cf::History, &addr_key(sh), from, &mut |key, _| {
                // One row per tx; the scan starts at the cursor's own row if the address has one.
                if let Some(at) = parse_history_key(key)
                    && before.is_none_or(|b| at < b)
                {
                    if positions.len() == limit {
                        return false;
                    }
                    positions.push(at);
                }
                true
            })?;
        positions
            .into_iter()
            .map(|(height, position)| self.tx_detail_at(height, position))
            .collect()
    }

    /// Outputs paying `sh` that nobody has spent (as far as resolution has got). An unspent coin always
    /// has its `outputs` row (only coins spent in the window that created them never get one), which
    /// gives its value.
    pub fn utxos(&self, sh: &ScriptHash) -> Result<Vec<pb::Utxo>, ShardError> {
        // (height, position, vout) of every output paying `sh`, in key order.
        let funding: Vec<(u32, u32, u32)> = self
            .funding_rows(sh, ScanFrom::First, &mut |height| !self.above_tip(height))?
            .into_iter()
            .flat_map(|(height, position, vouts)| {
                vouts.into_iter().map(move |vout| (height, position, vout))
            })
            .collect();
        let mut utxos = Vec::new();
        for (height, position, vout) in funding {
            let key = coin_key(height, position, vout);
            let spent_above_tip = match self.rows().get(Cf::Outspends, &key)? {
                None => false,
                Some(value) => {
                    let by = SpentBy::decode(&value)
                        .ok_or_else(|| corrupt("outspend", hex::encode(key)))?;
                    if !self.above_tip(by.height) {
                        continue;
                    }
                    true
                }
            };
            let missing = || {
                corrupt(
                    "unspent output",
                    format!("no outputs row paying this address at {height}:{position}:{vout}"),
                )
            };
            let (txid, value, script) = match self.rows().get(Cf::Outputs, &key)? {
                Some(bytes) => {
                    let (txid, value, script) =
                        decode_output(&bytes).ok_or_else(|| corrupt("output", hex::encode(key)))?;
                    (*txid, value, script.to_vec())
                }
                // Spent above the tip once spent coins' rows were dropped: the coin is in its tx's body.
                None if spent_above_tip => {
                    let body = self.tx_body(height, position)?;
                    let out = body.tx.output.get(vout as usize).ok_or_else(missing)?;
                    (body.txid, out.value.to_sat(), out.script_pubkey.to_bytes())
                }
                None => return Err(missing()),
            };
            // A ground txid pair sharing a 12-byte key can have one's coin row written where the other's
            // was looked up: it must be a coin of this address, or this fails rather than answer it.
            if scripthash(bitcoin::Script::from_bytes(&script)) != *sh {
                return Err(missing());
            }
            utxos.push(pb::Utxo {
                txid: txid.to_vec(),
                vout,
                value,
                status: Some(self.tx_status(height, position)?),
            });
        }
        Ok(utxos)
    }

    /// The txid of each spender this shard holds; `None` for heights outside it. Each is hashed from the
    /// tx's body, read in block order so that a source fetching whole blocks (`rpc:`, 16 kept) fetches
    /// each block once, and the body's input must spend the outpoint named with it (`check_spender`).
    pub fn spender_txids(
        &self,
        spends: &[pb::SpendRef],
    ) -> Result<Vec<Option<Hash32>>, ShardError> {
        let next_height = self.shard.state().next_height;
        let mut order: Vec<usize> = (0..spends.len()).collect();
        order.sort_unstable_by_key(|&i| (spends[i].spender_height, spends[i].spender_position));
        let mut txids = vec![None; spends.len()];
        for i in order {
            let spend = &spends[i];
            let height = spend.spender_height;
            if height >= self.shard.start && height < next_height {
                let body = self.tx_body(height, spend.spender_position)?;
                check_spender(&body.tx, spend)?;
                txids[i] = Some(body.txid);
            }
        }
        Ok(txids)
    }

    pub fn block(
        &self,
        key: &pb::shard_block_request::Key,
        with_txids: bool,
    ) -> Result<pb::BlockLookup, ShardError> {
        let height = match key {
            pb::shard_block_request::Key::Height(h) => Some(*h),
            pb::shard_block_request::Key::Hash(hash) => self
                .rows()
                .get(Cf::BlockHashes, hash)?
                .map(|v| schema::be_u32(&v)),
        };
        let Some(height) = height.filter(|&h| !self.above_tip(h)) else {
            return Ok(pb::BlockLookup::default());
        };
        let Some(meta) = self.block_meta(height)? else {
            return Ok(pb::BlockLookup::default());
        };
        let mut txids = Vec::new();
        if with_txids {
            // Only the block's body has whole txids.
            for (_, txid, _) in self.block_txs(height)? {
                txids.push(txid.to_vec());
            }
        }
        Ok(pb::BlockLookup {
            found: true,
            height,
            meta: Some(meta),
            txids,
            median_time: 0,
        })
    }

    /// Who spends each output of `txid`, with the height of the tx. A spender is named by where it is
    /// (height, position, vin); the coordinator asks the spender's shard for its txid (`txids_at`).
    pub fn outspends(&self, txid: &Hash32) -> Result<Option<(u32, Vec<pb::Outspend>)>, ShardError> {
        let Some(TxBody {
            height,
            position,
            tx,
            ..
        }) = self
            .find_tx(txid)?
            .filter(|body| !self.above_tip(body.height))
        else {
            return Ok(None);
        };
        let mut outspends = Vec::with_capacity(tx.output.len());
        for vout in 0..tx.output.len() as u32 {
            let spend = match self
                .rows()
                .get(Cf::Outspends, &coin_key(height, position, vout))?
            {
                Some(value) => {
                    let by =
                        SpentBy::decode(&value).ok_or_else(|| corrupt("outspend", "malformed"))?;
                    if self.above_tip(by.height) {
                        outspends.push(pb::Outspend::default());
                        continue;
                    }
                    pb::Outspend {
                        spent: true,
                        txid: Vec::new(),
                        vin: by.vin,
                        height: by.height,
                        position: by.position,
                    }
                }
                None => pb::Outspend::default(),
            };
            outspends.push(spend);
        }
        Ok(Some((height, outspends)))
    }
}

/// `stats` less `part`, field by field. `part` was counted from rows that `stats` sums, so it cannot be
/// larger; if it is, the rows disagree with their stats.
fn subtract(
    stats: pb::AddressStats,
    part: &pb::AddressStats,
) -> Result<pb::AddressStats, ShardError> {
    let less = |total: u64, part: u64| {
        total.checked_sub(part).ok_or_else(|| {
            corrupt(
                "address stats",
                "the blocks above the tip added more than the stats row holds",
            )
        })
    };
    Ok(pb::AddressStats {
        funded_txo_count: less(stats.funded_txo_count, part.funded_txo_count)?,
        funded_sum: less(stats.funded_sum, part.funded_sum)?,
        spent_txo_count: less(stats.spent_txo_count, part.spent_txo_count)?,
        spent_sum: less(stats.spent_sum, part.spent_sum)?,
        tx_count: less(stats.tx_count, part.tx_count)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rocks::RocksStore;
    use chainidx_core::generator::{GenConfig, generate};
    use chainidx_core::source::BlkDirSource;
    use std::collections::BTreeSet;
    use std::path::Path;

    const BLOCKS: u32 = 40;
    const TIP: u32 = 33;

    /// A shard of every block, written one block at a time as the tip is followed, up to `last`.
    fn indexed_to(dir: &Path, source: &Arc<dyn BlockSource>, blocks: &[Block], last: u32) -> Shard {
        let store = RocksStore::open(&dir.join(format!("shard-to-{last}"))).unwrap();
        let shard = Shard::open(Arc::new(store), source.clone(), 0, 0, BLOCKS).unwrap();
        let mut window = shard.window(Write::Logged, 1, 1);
        for height in 0..=last {
            window.add(height, &blocks[height as usize], None).unwrap();
            window.commit().unwrap();
        }
        shard
    }

    /// Every answer of the full shard pinned at `TIP`, for every address and tx of the chain, against a
    /// shard that never indexed a block above it: stats (counted back out of the blocks above), every
    /// history page, UTXOs (coins spent above the tip are unspent there, coins created above it absent),
    /// txs, outspends and blocks. Then again once spent coins' `outputs` rows are dropped, as after the
    /// backfill, so that coins spent above the tip are read from their bodies.
    #[test]
    fn a_view_pinned_to_a_tip_answers_like_a_shard_that_stopped_there() {
        let dir = tempfile::tempdir().unwrap();
        let chain = dir.path().join("chain");
        let config = GenConfig {
            blocks: BLOCKS,
            seed: 7,
            txs_per_block: 30,
            hot_address_share: 0.2,
        };
        generate(&config, &chain, &mut |_| {}).unwrap();
        let source: Arc<dyn BlockSource> = Arc::new(BlkDirSource::open(&chain).unwrap());
        let blocks: Vec<Block> = (0..BLOCKS)
            .map(|height| deserialize(&source.block_bytes(height).unwrap()).unwrap())
            .collect();
        let full = indexed_to(dir.path(), &source, &blocks, BLOCKS - 1);
        let stopped = indexed_to(dir.path(), &source, &blocks, TIP);

        let addresses: BTreeSet<ScriptHash> = blocks
            .iter()
            .flat_map(|b| &b.txdata)
            .flat_map(|tx| &tx.output)
            .map(|out| scripthash(&out.script_pubkey))
            .collect();
        let txids: Vec<Hash32> = blocks
            .iter()
            .flat_map(|b| &b.txdata)
            .map(|tx| tx.compute_txid().to_byte_array())
            .collect();

        let compare = |full: &Shard| {
            let (pinned, stopped) = (full.view_at(Some(TIP)).unwrap(), stopped.view());
            let mut moved = (0, 0, 0); // addresses whose stats, UTXOs, history differ unpinned
            for sh in &addresses {
                let stats = pinned.address_stats(sh).unwrap();
                assert_eq!(stats, stopped.address_stats(sh).unwrap());
                moved.0 += usize::from(full.view().address_stats(sh).unwrap() != stats);
                let utxos = pinned.utxos(sh).unwrap();
                assert_eq!(utxos, stopped.utxos(sh).unwrap());
                moved.1 += usize::from(full.view().utxos(sh).unwrap() != utxos);
                // Pages of 7, newest first, from no cursor and from a cursor above the tip.
                let mut cursor = None;
                loop {
                    let page = pinned.history(sh, cursor, 7).unwrap();
                    assert_eq!(page, stopped.history(sh, cursor, 7).unwrap());
                    match page.last().and_then(|tx| tx.status.clone()) {
                        Some(s) if page.len() == 7 => cursor = Some((s.height, s.position)),
                        _ => break,
                    }
                }
                let above = Some((BLOCKS, 0));
                assert_eq!(
                    pinned.history(sh, above, 7).unwrap(),
                    stopped.history(sh, None, 7).unwrap()
                );
                moved.2 += usize::from(
                    full.view().history(sh, None, 7).unwrap()
                        != stopped.history(sh, None, 7).unwrap(),
                );
            }
            for txid in &txids {
                assert_eq!(pinned.tx(txid).unwrap(), stopped.tx(txid).unwrap());
                assert_eq!(
                    pinned.outspends(txid).unwrap(),
                    stopped.outspends(txid).unwrap()
                );
            }
            for height in 0..BLOCKS {
                let key = pb::shard_block_request::Key::Height(height);
                assert_eq!(
                    pinned.block(&key, true).unwrap(),
                    stopped.block(&key, true).unwrap()
                );
            }
            moved
        };
        let (stats, utxos, history) = compare(&full);
        // The blocks above the tip touch many addresses, in each kind of answer.
        assert!(
            stats > 20 && utxos > 20 && history > 20,
            "{stats} {utxos} {history}"
        );

        let dropped = drop_spent_outputs(&*full.store, &full.coin_rows).unwrap();
        assert!(dropped > 0);
        compare(&full);
    }
}
