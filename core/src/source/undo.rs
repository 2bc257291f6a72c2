//! Bitcoin Core's block undo records (`rev*.dat`): for every input of a block, the coin it spent — value,
//! script, and the height that created it. Formats as in Core's `undo.h`, `compressor.cpp`, `serialize.h`.

use super::SpentCoin;
use bitcoin::ScriptBuf;
use bitcoin::secp256k1::PublicKey;

pub struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    pub fn new(bytes: &'a [u8]) -> Reader<'a> {
        Reader { bytes, at: 0 }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.bytes.len());
        let end = end.ok_or_else(|| {
            format!(
                "undo record ends early at byte {} (wanted {n} more)",
                self.at
            )
        })?;
        let out = &self.bytes[self.at..end];
        self.at = end;
        Ok(out)
    }

    fn byte(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }

    /// Bitcoin's CompactSize.
    pub fn compact_size(&mut self) -> Result<u64, String> {
        Ok(match self.byte()? {
            0xfd => u16::from_le_bytes(self.take(2)?.try_into().expect("2")) as u64,
            0xfe => u32::from_le_bytes(self.take(4)?.try_into().expect("4")) as u64,
            0xff => u64::from_le_bytes(self.take(8)?.try_into().expect("8")),
            n => n as u64,
        })
    }

    /// Core's VARINT: base-128, most significant group first, each continuation adding one.
    pub fn varint(&mut self) -> Result<u64, String> {
        let mut n: u64 = 0;
        loop {
            let byte = self.byte()?;
            n = n.checked_mul(128).ok_or("VARINT overflows")? | (byte & 0x7f) as u64;
            if byte & 0x80 == 0 {
                return Ok(n);
            }
            n = n.checked_add(1).ok_or("VARINT overflows")?;
        }
    }

    pub fn is_empty(&self) -> bool {
        self.at == self.bytes.len()
    }
}

/// Inverse of Core's `CompressAmount`.
pub fn decompress_amount(mut x: u64) -> u64 {
    if x == 0 {
        return 0;
    }
    x -= 1;
    let mut e = x % 10;
    x /= 10;
    let mut n = if e < 9 {
        let d = (x % 9) + 1;
        x /= 9;
        x * 10 + d
    } else {
        x + 1
    };
    while e > 0 {
        n *= 10;
        e -= 1;
    }
    n
}

/// Core's `ScriptCompression`: six special forms, otherwise length + 6 and the raw script.
fn decompress_script(reader: &mut Reader) -> Result<ScriptBuf, String> {
    let kind = reader.varint()?;
    let mut script = Vec::new();
    match kind {
        0 => {
            script.extend_from_slice(&[0x76, 0xa9, 20]);
            script.extend_from_slice(reader.take(20)?);
            script.extend_from_slice(&[0x88, 0xac]);
        }
        1 => {
            script.extend_from_slice(&[0xa9, 20]);
            script.extend_from_slice(reader.take(20)?);
            script.push(0x87);
        }
        2 | 3 => {
            script.push(33);
            script.push(kind as u8);
            script.extend_from_slice(reader.take(32)?);
            script.push(0xac);
        }
        4 | 5 => {
            let mut compressed = [0u8; 33];
            compressed[0] = (kind - 2) as u8;
            compressed[1..].copy_from_slice(reader.take(32)?);
            let key = PublicKey::from_slice(&compressed)
                .map_err(|e| format!("compressed P2PK key: {e}"))?;
            script.push(65);
            script.extend_from_slice(&key.serialize_uncompressed());
            script.push(0xac);
        }
        n => script.extend_from_slice(reader.take((n - 6) as usize)?),
    }
    Ok(ScriptBuf::from_bytes(script))
}

/// Parses a `CBlockUndo`: one list of spent coins per non-coinbase transaction, in input order.
pub fn parse_block_undo(bytes: &[u8]) -> Result<Vec<Vec<SpentCoin>>, String> {
    let mut reader = Reader::new(bytes);
    let txs = reader.compact_size()?;
    let mut block = Vec::with_capacity(txs.min(100_000) as usize);
    for _ in 0..txs {
        let coins = reader.compact_size()?;
        let mut tx = Vec::with_capacity(coins.min(100_000) as usize);
        for _ in 0..coins {
            let code = reader.varint()?;
            let height = (code >> 1) as u32;
            if height > 0 {
                reader.varint()?; // legacy transaction-version field, always 0
            }
            let value = decompress_amount(reader.varint()?);
            let script = decompress_script(&mut reader)?;
            tx.push(SpentCoin {
                height,
                coinbase: code & 1 == 1,
                value,
                script,
            });
        }
        block.push(tx);
    }
    if !reader.is_empty() {
        return Err("undo record has trailing bytes".into());
    }
    Ok(block)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amounts_and_varints_decode_like_core() {
        // Values from Bitcoin Core's compress_tests (CompressAmount of 0, 1 sat, 1 cent, 1 BTC, 50 BTC, 21M BTC).
        assert_eq!(decompress_amount(0), 0);
        assert_eq!(decompress_amount(0x1), 1);
        assert_eq!(decompress_amount(0x7), 1_000_000);
        assert_eq!(decompress_amount(0x9), 100_000_000);
        assert_eq!(decompress_amount(0x32), 5_000_000_000);
        assert_eq!(decompress_amount(0x1406f40), 21_000_000 * 100_000_000);
        assert_eq!(Reader::new(&[0x80, 0x00]).varint().unwrap(), 128);
        assert_eq!(Reader::new(&[0x7f]).varint().unwrap(), 127);
        assert_eq!(Reader::new(&[0x80, 0x7f]).varint().unwrap(), 255);
    }
}
