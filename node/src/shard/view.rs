//! The read side of a shard: what queries (and indexing work that reads back its own rows) ask of it.

use super::*;

/// A shard's rows as one query reads them: [`Shard::view`] holds one snapshot for the whole query, so that a
/// block written or rolled back beside it is in all of its reads or in none (a history page's rows, then
/// each tx's place, header and spent coins; a UTXO's `outspends` then `outputs` row). `Shard::live`
/// reads the live rows, for indexing work that must see what was just written.
pub struct ShardView<'a> {
    shard: &'a Shard,
    rows: Rows<'a>,
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
        }
    }

    /// This shard's live rows, read through the same code as queries' views.
    pub(super) fn live(&self) -> ShardView<'_> {
        ShardView {
            shard: self,
            rows: Rows::Live(&*self.store),
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

    pub fn address_stats(&self, sh: &ScriptHash) -> Result<pb::AddressStats, ShardError> {
        self.load_stats(sh)
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
        match self.find_tx(txid)? {
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

    pub(super) fn tx_detail(&self, body: TxBody) -> Result<pb::TxDetail, ShardError> {
        let TxBody {
            height,
            position,
            raw,
            tx,
            status,
            ..
        } = body;
        // Inputs not yet resolved (shard still in phase 1 or 2) stay empty. Point lookups, not a scan:
        // they read only the files whose height range covers them (one, once the shard is compacted).
        let mut prevouts = vec![pb::TxOut::default(); tx.input.len()];
        if !tx.is_coinbase() {
            let keys: Vec<[u8; 12]> = (0..tx.input.len() as u32)
                .map(|vin| pending_key(height, position, vin))
                .collect();
            let key_refs: Vec<&[u8]> = keys.iter().map(|key| key.as_slice()).collect();
            let values = self.rows().multi_get(Cf::Prevouts, &key_refs)?;
            for (((slot, key), value), input) in
                prevouts.iter_mut().zip(&keys).zip(values).zip(&tx.input)
            {
                if let Some(bytes) = value {
                    *slot = prevout(&bytes, key, input)?;
                }
            }
        }
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
        let mut funding: Vec<(u32, u32, u32)> = Vec::new();
        let mut malformed = None;
        self.rows().scan(
            Cf::History,
            &addr_key(sh),
            ScanFrom::First,
            &mut |key, value| {
                if let Some((height, position)) = parse_history_key(key) {
                    match decode_funding_vouts(value) {
                        Some(vouts) => {
                            funding.extend(vouts.into_iter().map(|vout| (height, position, vout)))
                        }
                        None => {
                            malformed = Some(hex::encode(key));
                            return false;
                        }
                    }
                }
                true
            },
        )?;
        if let Some(key) = malformed {
            return Err(corrupt("history row", key));
        }
        let mut utxos = Vec::new();
        for (height, position, vout) in funding {
            let key = coin_key(height, position, vout);
            if self.rows().get(Cf::Outspends, &key)?.is_some() {
                continue;
            }
            let missing = || {
                corrupt(
                    "unspent output",
                    format!("no outputs row paying this address at {height}:{position}:{vout}"),
                )
            };
            let bytes = self.rows().get(Cf::Outputs, &key)?.ok_or_else(missing)?;
            let (txid, value, script) =
                decode_output(&bytes).ok_or_else(|| corrupt("output", hex::encode(key)))?;
            // A ground txid pair sharing a 12-byte key can have one's coin row written where the other's
            // was looked up: it must be a coin of this address, or this fails rather than answer it.
            if scripthash(bitcoin::Script::from_bytes(script)) != *sh {
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
        let Some(height) = height else {
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
        }) = self.find_tx(txid)?
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
