//! Script classification, script hashes and address encoding.
//!
//! Addresses are indexed by *scripthash* (SHA256 of the scriptPubKey, as Esplora does), so scripts that have
//! no address (P2PK, bare multisig, non-standard) are indexed too; an address is only a way to spell a script.

use bitcoin::hashes::{Hash, sha256};
use bitcoin::opcodes::all::OP_CHECKMULTISIG;
use bitcoin::{Address, Network, Script, ScriptBuf};
use std::str::FromStr;

/// SHA256 of a scriptPubKey: the row prefix of every per-address row.
pub type ScriptHash = [u8; 32];

pub fn scripthash(script: &Script) -> ScriptHash {
    sha256::Hash::hash(script.as_bytes()).to_byte_array()
}

/// The standard output kinds, named as in `shared/data/.../expected/*.tsv` (see [`ScriptType::as_str`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScriptType {
    P2pkh,
    P2sh,
    P2wpkh,
    P2wsh,
    P2tr,
    P2pk,
    Multisig,
    Nulldata,
    Nonstandard,
}

impl ScriptType {
    pub fn of(script: &Script) -> ScriptType {
        if script.is_p2pkh() {
            ScriptType::P2pkh
        } else if script.is_p2sh() {
            ScriptType::P2sh
        } else if script.is_p2wpkh() {
            ScriptType::P2wpkh
        } else if script.is_p2wsh() {
            ScriptType::P2wsh
        } else if script.is_p2tr() {
            ScriptType::P2tr
        } else if script.is_p2pk() {
            ScriptType::P2pk
        } else if script.is_op_return() {
            ScriptType::Nulldata
        } else if is_bare_multisig(script) {
            ScriptType::Multisig
        } else {
            ScriptType::Nonstandard
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ScriptType::P2pkh => "p2pkh",
            ScriptType::P2sh => "p2sh",
            ScriptType::P2wpkh => "p2wpkh",
            ScriptType::P2wsh => "p2wsh",
            ScriptType::P2tr => "p2tr",
            ScriptType::P2pk => "p2pk",
            ScriptType::Multisig => "multisig",
            ScriptType::Nulldata => "nulldata",
            ScriptType::Nonstandard => "nonstandard",
        }
    }

    /// The `scriptpubkey_type` names Esplora clients expect.
    pub fn esplora_name(self, script: &Script) -> &'static str {
        match self {
            ScriptType::P2pkh => "p2pkh",
            ScriptType::P2sh => "p2sh",
            ScriptType::P2wpkh => "v0_p2wpkh",
            ScriptType::P2wsh => "v0_p2wsh",
            ScriptType::P2tr => "v1_p2tr",
            ScriptType::P2pk => "p2pk",
            ScriptType::Multisig => "multisig",
            ScriptType::Nulldata => "op_return",
            ScriptType::Nonstandard if script.is_empty() => "empty",
            ScriptType::Nonstandard => "unknown",
        }
    }
}

/// `OP_m <pubkeys...> OP_n OP_CHECKMULTISIG` with 1 <= m <= n <= 16.
fn is_bare_multisig(script: &Script) -> bool {
    let bytes = script.as_bytes();
    let (Some(&first), Some(&last)) = (bytes.first(), bytes.last()) else {
        return false;
    };
    if last != OP_CHECKMULTISIG.to_u8() || bytes.len() < 3 {
        return false;
    }
    let small_int = |op: u8| (0x51..=0x60).contains(&op).then(|| op - 0x50);
    let (Some(m), Some(n)) = (small_int(first), small_int(bytes[bytes.len() - 2])) else {
        return false;
    };
    let mut keys = 0u8;
    for instruction in script.instructions() {
        match instruction {
            Ok(bitcoin::script::Instruction::PushBytes(push)) => {
                if push.len() != 33 && push.len() != 65 {
                    return false;
                }
                keys += 1;
            }
            Ok(_) => {}
            Err(_) => return false,
        }
    }
    m <= n && keys == n
}

/// The address that spells `script` on `network`, if it has one.
pub fn address_of(script: &Script, network: Network) -> Option<String> {
    Address::from_script(script, network)
        .ok()
        .map(|address| address.to_string())
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AddressError {
    #[error("'{0}' is not a valid address")]
    Malformed(String),
    #[error("address '{address}' is not for network {network}")]
    WrongNetwork { address: String, network: Network },
    #[error("'{0}' is not a 64-hex-digit script hash")]
    BadScriptHash(String),
}

/// Parses an address for `network` into its scriptPubKey.
pub fn script_for_address(address: &str, network: Network) -> Result<ScriptBuf, AddressError> {
    let unchecked =
        Address::from_str(address).map_err(|_| AddressError::Malformed(address.into()))?;
    let checked = unchecked
        .require_network(network)
        .map_err(|_| AddressError::WrongNetwork {
            address: address.into(),
            network,
        })?;
    Ok(checked.script_pubkey())
}

/// Parses an Esplora scripthash: hex SHA256 of the scriptPubKey, in natural (not reversed) byte order.
pub fn parse_scripthash(hex_str: &str) -> Result<ScriptHash, AddressError> {
    let bytes = hex::decode(hex_str).map_err(|_| AddressError::BadScriptHash(hex_str.into()))?;
    bytes
        .try_into()
        .map_err(|_| AddressError::BadScriptHash(hex_str.into()))
}

/// `mainnet`, `testnet`, `signet`, `regtest` (and rust-bitcoin's own names).
pub fn parse_network(name: &str) -> Result<Network, String> {
    match name {
        "mainnet" | "bitcoin" | "main" => Ok(Network::Bitcoin),
        "testnet" | "testnet3" | "test" => Ok(Network::Testnet),
        "signet" => Ok(Network::Signet),
        "regtest" => Ok(Network::Regtest),
        other => Err(format!(
            "unknown network '{other}': use mainnet, testnet, signet or regtest"
        )),
    }
}

/// Block subsidy for mainnet-like schedules (halving every 210,000 blocks).
pub fn subsidy(height: u32) -> u64 {
    let halvings = height / 210_000;
    if halvings >= 64 {
        0
    } else {
        (50 * 100_000_000u64) >> halvings
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_standard_scripts() {
        let p2pkh =
            ScriptBuf::from_hex("76a91427a1f12771de5cc3b73941664b2537c15316be4388ac").unwrap();
        assert_eq!(ScriptType::of(&p2pkh), ScriptType::P2pkh);
        assert_eq!(
            address_of(&p2pkh, Network::Bitcoin).as_deref(),
            Some("14cZMQk89mRYQkDEj8Rn25AnGoBi5H6uer")
        );
        let op_return = ScriptBuf::from_hex("6a0401020304").unwrap();
        assert_eq!(ScriptType::of(&op_return), ScriptType::Nulldata);
        assert_eq!(address_of(&op_return, Network::Bitcoin), None);
    }

    #[test]
    fn rejects_bad_and_foreign_addresses() {
        assert!(matches!(
            script_for_address("nonsense", Network::Bitcoin),
            Err(AddressError::Malformed(_))
        ));
        assert!(matches!(
            script_for_address("14cZMQk89mRYQkDEj8Rn25AnGoBi5H6uer", Network::Regtest),
            Err(AddressError::WrongNetwork { .. })
        ));
        assert!(parse_scripthash("abcd").is_err());
    }
}
