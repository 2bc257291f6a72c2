//! Rebuilding a spent coin's script from the input that spends it, so that `prevouts` need not keep it.
//!
//! Most inputs carry what their coin's script commits to: a P2PKH input pushes the public key whose
//! HASH160 the script holds, a P2SH input its redeem script, a P2WPKH input its key in the witness, a
//! P2WSH input its witness script. A `prevouts` row then keeps a [`Template`] tag instead of the 22–34
//! script bytes, and its reader, which holds the spending tx's body anyway (tx and history answers include
//! it; a rollback reads the block), rebuilds the script. The writer checks that the rebuilt script is the
//! coin's, byte for byte, so nothing here relies on the chain's consensus rules: an input whose data does
//! not rebuild its coin's script (taproot key spends, P2PK, bare multisig, anything odd) keeps the script
//! in full. [`commitment`] is part of the on-disk format: rows written by one rule are read back by it, so
//! changing which hash it picks for an input's shape needs a new `schema::FORMAT_VERSION`.

use bitcoin::TxIn;
use bitcoin::hashes::{Hash, hash160, sha256};
use bitcoin::script::{Instruction, Script};

/// The hash an input's own data commits its coin's script to. It is picked by the input's shape alone,
/// so a reader holding only the input finds the same one the writer compared.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Commitment {
    /// HASH160 of the scriptSig's last push (P2PKH's key, P2SH's redeem script, also a wrapped witness
    /// program), or of the key of a two-item witness (P2WPKH).
    Hash160([u8; 20]),
    /// SHA256 of the last witness item (P2WSH's witness script).
    Sha256([u8; 32]),
}

/// The hash `input`'s data commits to, if its shape has one. A scriptSig that is not push-only, an input
/// with neither scriptSig nor witness, and a lone 64/65-byte witness item (a taproot key spend, whose
/// output key no input data gives) have none.
pub fn commitment(input: &TxIn) -> Option<Commitment> {
    let script_sig = input.script_sig.as_script();
    if !script_sig.is_empty() {
        return last_push(script_sig).map(|data| Commitment::Hash160(hash160_of(data)));
    }
    let last = input.witness.last()?;
    match input.witness.len() {
        1 if matches!(last.len(), 64 | 65) => None,
        2 if last.len() == 33 => Some(Commitment::Hash160(hash160_of(last))),
        _ => Some(Commitment::Sha256(sha256::Hash::hash(last).to_byte_array())),
    }
}

fn hash160_of(data: &[u8]) -> [u8; 20] {
    hash160::Hash::hash(data).to_byte_array()
}

/// What OP_1NEGATE and OP_1..OP_16 push (as Bitcoin's `IsPushOnly` counts them: pushes).
const SMALL_NUMBERS: [u8; 17] = [0x81, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16];

/// The item a push-only script leaves on top of the stack; `None` if any instruction is another opcode
/// or does not parse.
fn last_push(script: &Script) -> Option<&[u8]> {
    let mut last = None;
    for instruction in script.instructions() {
        match instruction.ok()? {
            Instruction::PushBytes(data) => last = Some(data.as_bytes()),
            Instruction::Op(op) => {
                let number = match op.to_u8() {
                    0x4f => 0,                         // OP_1NEGATE
                    code @ 0x51..=0x60 => code - 0x50, // OP_1..OP_16
                    _ => return None,
                };
                last = Some(&SMALL_NUMBERS[usize::from(number)..=usize::from(number)]);
            }
        }
    }
    last
}

/// A script shape that holds nothing but a [`Commitment`]; its tag is what a `prevouts` row keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Template {
    P2pkh = 1,
    P2sh = 2,
    P2wpkh = 3,
    P2wsh = 4,
}

impl Template {
    pub fn tag(self) -> u8 {
        self as u8
    }

    pub fn from_tag(tag: u8) -> Option<Template> {
        match tag {
            1 => Some(Template::P2pkh),
            2 => Some(Template::P2sh),
            3 => Some(Template::P2wpkh),
            4 => Some(Template::P2wsh),
            _ => None,
        }
    }

    /// The template `script` has the shape of, if any (its bytes only: nothing is hashed).
    fn of(script: &[u8]) -> Option<Template> {
        let script = Script::from_bytes(script);
        if script.is_p2wpkh() {
            Some(Template::P2wpkh)
        } else if script.is_p2pkh() {
            Some(Template::P2pkh)
        } else if script.is_p2sh() {
            Some(Template::P2sh)
        } else if script.is_p2wsh() {
            Some(Template::P2wsh)
        } else {
            None
        }
    }

    /// The script of this shape holding `commitment`; `None` if it is the other kind of hash.
    pub fn script(self, commitment: &Commitment) -> Option<Vec<u8>> {
        let mut script = Vec::with_capacity(34);
        match (self, commitment) {
            (Template::P2pkh, Commitment::Hash160(hash)) => {
                script.extend_from_slice(&[0x76, 0xa9, 0x14]);
                script.extend_from_slice(hash);
                script.extend_from_slice(&[0x88, 0xac]);
            }
            (Template::P2sh, Commitment::Hash160(hash)) => {
                script.extend_from_slice(&[0xa9, 0x14]);
                script.extend_from_slice(hash);
                script.push(0x87);
            }
            (Template::P2wpkh, Commitment::Hash160(hash)) => {
                script.extend_from_slice(&[0x00, 0x14]);
                script.extend_from_slice(hash);
            }
            (Template::P2wsh, Commitment::Sha256(hash)) => {
                script.extend_from_slice(&[0x00, 0x20]);
                script.extend_from_slice(hash);
            }
            _ => return None,
        }
        Some(script)
    }
}

/// The template under which `commitment` rebuilds exactly `script`, if there is one. A script of a
/// template's shape is its fixed bytes around the hash, so comparing the hash compares the whole script
/// (and builds nothing: this runs for every input of a backfill).
pub fn template_matching(script: &[u8], commitment: &Commitment) -> Option<Template> {
    let template = Template::of(script)?;
    let (hash, at): (&[u8], usize) = match (template, commitment) {
        (Template::P2wsh, Commitment::Sha256(hash)) => (hash, 2),
        (Template::P2pkh, Commitment::Hash160(hash)) => (hash, 3),
        (Template::P2sh | Template::P2wpkh, Commitment::Hash160(hash)) => (hash, 2),
        _ => return None,
    };
    (script.get(at..at + hash.len()) == Some(hash)).then_some(template)
}

/// The template under which `input` rebuilds exactly `script`, if there is one. Hashes the input's data
/// only when `script` has a template's shape.
pub fn template_for(script: &[u8], input: &TxIn) -> Option<Template> {
    Template::of(script)?;
    template_matching(script, &commitment(input)?)
}

/// The script a `prevouts` row tagged `template` stands for, rebuilt from the spending `input`.
pub fn rebuild(template: Template, input: &TxIn) -> Option<Vec<u8>> {
    template.script(&commitment(input)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bitcoin::{OutPoint, ScriptBuf, Sequence, Witness};

    fn input(script_sig: Vec<u8>, witness: &[&[u8]]) -> TxIn {
        TxIn {
            previous_output: OutPoint::null(),
            script_sig: ScriptBuf::from_bytes(script_sig),
            sequence: Sequence::MAX,
            witness: Witness::from_slice(witness),
        }
    }

    fn push(script: &mut Vec<u8>, data: &[u8]) {
        script.push(data.len() as u8);
        script.extend_from_slice(data);
    }

    #[test]
    fn each_template_is_rebuilt_from_the_data_its_spender_reveals() {
        let key = [0x02; 33];
        let sig = [0x30; 72];
        let key_hash = hash160_of(&key);
        let multisig = [0x52, 0x21, 0x03, 0xae];
        let mut p2pkh_sig = Vec::new();
        push(&mut p2pkh_sig, &sig);
        push(&mut p2pkh_sig, &key);
        let p2pkh = bitcoin::PubkeyHash::from_byte_array(key_hash);
        let cases = [
            (
                input(p2pkh_sig, &[]),
                ScriptBuf::new_p2pkh(&p2pkh),
                Template::P2pkh,
            ),
            (
                input(Vec::new(), &[&sig, &key]),
                ScriptBuf::new_p2wpkh(&bitcoin::WPubkeyHash::from_byte_array(key_hash)),
                Template::P2wpkh,
            ),
            (
                input(Vec::new(), &[&[], &sig, &multisig]),
                ScriptBuf::new_p2wsh(&bitcoin::WScriptHash::from_byte_array(
                    sha256::Hash::hash(&multisig).to_byte_array(),
                )),
                Template::P2wsh,
            ),
        ];
        for (spender, script, template) in cases {
            assert_eq!(template_for(script.as_bytes(), &spender), Some(template));
            assert_eq!(
                rebuild(template, &spender).as_deref(),
                Some(script.as_bytes())
            );
            let tag = template.tag();
            assert_eq!(Template::from_tag(tag), Some(template));
        }
        // P2SH-wrapped P2WPKH: the scriptSig pushes the redeem script, the witness holds the key.
        let redeem = ScriptBuf::new_p2wpkh(&bitcoin::WPubkeyHash::from_byte_array(key_hash));
        let mut wrapped_sig = Vec::new();
        push(&mut wrapped_sig, redeem.as_bytes());
        let wrapped = input(wrapped_sig, &[&sig, &key]);
        let script = ScriptBuf::new_p2sh(&bitcoin::ScriptHash::from_byte_array(hash160_of(
            redeem.as_bytes(),
        )));
        assert_eq!(
            template_for(script.as_bytes(), &wrapped),
            Some(Template::P2sh)
        );
        assert_eq!(
            rebuild(Template::P2sh, &wrapped).as_deref(),
            Some(script.as_bytes())
        );
        // Legacy P2SH multisig: OP_0 ‖ signatures ‖ redeem script, all pushes.
        let mut multisig_sig = vec![0x00];
        push(&mut multisig_sig, &sig);
        push(&mut multisig_sig, &multisig);
        let script =
            ScriptBuf::new_p2sh(&bitcoin::ScriptHash::from_byte_array(hash160_of(&multisig)));
        let spender = input(multisig_sig, &[]);
        assert_eq!(
            template_for(script.as_bytes(), &spender),
            Some(Template::P2sh)
        );
    }

    #[test]
    fn a_script_the_input_does_not_rebuild_is_kept_whole() {
        let key = [0x02; 33];
        let sig = [0x30; 72];
        let mut p2pkh_sig = Vec::new();
        push(&mut p2pkh_sig, &sig);
        push(&mut p2pkh_sig, &key);
        let spender = input(p2pkh_sig.clone(), &[]);
        // Another key's hash: same shape, different bytes.
        let other = ScriptBuf::new_p2pkh(&bitcoin::PubkeyHash::from_byte_array([7; 20]));
        assert_eq!(template_for(other.as_bytes(), &spender), None);
        // A taproot key spend reveals nothing; neither do P2PK's lone signature or a non-push scriptSig.
        let taproot = input(Vec::new(), &[&[0x11; 64]]);
        assert_eq!(commitment(&taproot), None);
        let p2tr = [[0x51, 0x20].as_slice(), &[0x22; 32]].concat();
        assert_eq!(template_for(&p2tr, &taproot), None);
        let p2pk = [[0x21].as_slice(), &key, &[0xac]].concat();
        assert_eq!(template_for(&p2pk, &spender), None);
        let mut not_push_only = p2pkh_sig.clone();
        not_push_only.push(0x76); // OP_DUP
        assert_eq!(commitment(&input(not_push_only, &[])), None);
        assert_eq!(commitment(&input(Vec::new(), &[])), None);
        // A P2WPKH-shaped script is never taken for a witness script's SHA256.
        let wsh_spender = input(Vec::new(), &[&[], &sig, &[0x51]]);
        let p2wpkh = [[0x00, 0x14].as_slice(), &[0x33; 20]].concat();
        assert_eq!(template_for(&p2wpkh, &wsh_spender), None);
        assert_eq!(
            Template::P2wpkh.script(&commitment(&wsh_spender).unwrap()),
            None
        );
        assert_eq!(Template::from_tag(0), None);
        assert_eq!(Template::from_tag(5), None);
    }

    /// Old rows are read back with today's rule: pinned digests (computed with Python's hashlib) catch a
    /// change of the rule, or of the script parser underneath it, that would misread them (then bump the
    /// format version).
    #[test]
    fn commitments_are_pinned() {
        let hex = |c: Option<Commitment>| match c {
            Some(Commitment::Hash160(h)) => format!("h160:{}", hex::encode(h)),
            Some(Commitment::Sha256(h)) => format!("sha256:{}", hex::encode(h)),
            None => "none".into(),
        };
        let key = [0x02; 33];
        let mut p2pkh_sig = Vec::new();
        push(&mut p2pkh_sig, &[0x30; 72]);
        push(&mut p2pkh_sig, &key);
        // An HTLC-style P2SH spend: ‹sig› OP_1 ‹redeem script›, the redeem script pushed with OP_PUSHDATA1.
        let mut htlc_sig = Vec::new();
        push(&mut htlc_sig, &[0x30; 72]);
        htlc_sig.push(0x51);
        htlc_sig.extend_from_slice(&[0x4c, 80]);
        htlc_sig.extend_from_slice(&[0x63; 80]);
        let cases = [
            (
                input(p2pkh_sig, &[]),
                "h160:51814f108670aced2d77c1805ddd6634bc9d4731",
            ),
            (
                input(htlc_sig, &[]),
                "h160:d06c43dacdebf772082b7289739a629f4fe5dffa",
            ),
            (
                input(vec![0x51], &[]),
                "h160:c51b66bced5e4491001bd702669770dccf440982",
            ),
            (
                input(Vec::new(), &[&[0x30; 72], &key]),
                "h160:51814f108670aced2d77c1805ddd6634bc9d4731",
            ),
            (
                input(Vec::new(), &[&[], &[0x51, 0xae]]),
                "sha256:5e49bec8cd8b5fa3a9dcc3744061a7f3bba1eda9175759ee37325527905519a9",
            ),
            (input(Vec::new(), &[&[0x11; 64]]), "none"),
        ];
        for (i, (spender, want)) in cases.iter().enumerate() {
            assert_eq!(hex(commitment(spender)), *want, "case {i}");
        }
    }
}
