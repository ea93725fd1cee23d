//! Running `nft`: a typed batch applied as one transaction (`nft -j -f -`), and a table or
//! the whole ruleset read back as a typed [`Listing`].

use std::{
    fmt::Write as _,
    io::Write as _,
    process::{Command, Stdio},
};

use nftables::{
    batch::Batch,
    schema::{FlushObject, NfCmd, NfListObject, NfObject, SetType, SetTypeValue},
    stmt::Statement,
    types::NfFamily,
};

use super::listing::{Listing, family_name};

/// Why `nft` did not do what it was asked.
#[derive(Debug, thiserror::Error)]
pub enum NftError {
    /// `nft` could not be run at all (not installed, no permission).
    #[error("running nft: {0}")]
    Spawn(#[source] std::io::Error),
    /// A batch was refused: nothing of it was applied.
    #[error("nft refused the batch (nothing was changed): {0}")]
    Refused(String),
    /// The table listed does not exist.
    #[error("no table {family} {name}")]
    NoTable { family: &'static str, name: String },
    /// A listing failed for another reason.
    #[error("nft could not list {what}: {error}")]
    List { what: String, error: String },
    /// What nft printed is not a ruleset.
    #[error("reading what nft listed: {0}")]
    Parse(#[source] serde_json::Error),
}

/// Applies `batch` as one transaction: all or nothing. nft's error output becomes the
/// error. (Declarations nft's JSON cannot hold go first, in a transaction of their own
/// that only adds what is missing: see [`encode`].)
pub fn run(batch: Batch<'_>) -> Result<(), NftError> {
    let encoded = encode(batch);
    if !encoded.declarations.is_empty() {
        nft_stdin(&["-f", "-"], encoded.declarations.as_bytes())?;
    }
    let json = serde_json::to_vec(&encoded.json).map_err(NftError::Parse)?;
    nft_stdin(&["-j", "-f", "-"], &json)
}

/// Runs `nft args` with `input` on its standard input.
fn nft_stdin(args: &[&str], input: &[u8]) -> Result<(), NftError> {
    let mut child = Command::new("nft")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(NftError::Spawn)?;
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(input)
        .map_err(NftError::Spawn)?;
    let out = child.wait_with_output().map_err(NftError::Spawn)?;
    if !out.status.success() {
        return Err(NftError::Refused(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ));
    }
    Ok(())
}

/// A batch as nft reads it.
pub struct Encoded {
    /// The declarations of maps whose values are a concatenation (`ipv4_addr .
    /// inet_service`), as nft's text: nft's JSON reader (1.0.6) takes no such type.
    pub declarations: String,
    /// Everything else, as nft's JSON.
    pub json: serde_json::Value,
}

/// `batch` as nft reads it. Where the `nftables` crate writes what nft does not take, it is
/// spelt nft's way:
/// - a map whose values are of type `mark` is a verdict map (the crate has no `verdict`
///   type; none of the agent's maps holds marks);
/// - the `notrack` statement, which the crate writes as a bare string, is nft's object form
///   (`{"notrack": null}`);
/// - a map whose values are a concatenation is declared in nft's text.
pub fn encode(batch: Batch<'_>) -> Encoded {
    let doc = batch.to_nftables();
    let mut objects = Vec::with_capacity(doc.objects.len());
    let mut declarations = String::new();
    for o in doc.objects.iter() {
        if let NfObject::CmdObject(NfCmd::Add(NfListObject::Map(m))) = o
            && let SetTypeValue::Concatenated(values) = &m.map
        {
            let f = family_name(m.family);
            let _ = writeln!(declarations, "add table {f} {}", m.table);
            let _ = writeln!(
                declarations,
                "add map {f} {} {} {{ type {} : {}; }}",
                m.table,
                m.name,
                type_text(&m.set_type),
                type_text(&SetTypeValue::Concatenated(values.clone())),
            );
            continue;
        }
        let mut v = serde_json::to_value(o).expect("the crate's objects encode");
        if let NfObject::CmdObject(cmd) = o {
            let (verb, obj) = match cmd {
                NfCmd::Add(obj) => ("add", Some(obj)),
                NfCmd::Create(obj) => ("create", Some(obj)),
                NfCmd::Insert(obj) => ("insert", Some(obj)),
                NfCmd::Delete(obj) => ("delete", Some(obj)),
                NfCmd::Flush(FlushObject::Map(m)) => {
                    if is_verdict_map(&m.map) {
                        v["flush"]["map"]["map"] = "verdict".into();
                    }
                    ("flush", None)
                }
                _ => ("", None),
            };
            match obj {
                Some(NfListObject::Map(m)) if is_verdict_map(&m.map) => {
                    v[verb]["map"]["map"] = "verdict".into();
                }
                Some(NfListObject::Rule(r)) => {
                    for (i, s) in r.expr.iter().enumerate() {
                        if matches!(s, Statement::Notrack) {
                            v[verb]["rule"]["expr"][i] = serde_json::json!({ "notrack": null });
                        }
                    }
                }
                _ => {}
            }
        }
        objects.push(v);
    }
    Encoded {
        declarations,
        json: serde_json::json!({ "nftables": objects }),
    }
}

/// A set type as nft's text names it (`ipv4_addr . inet_service`).
fn type_text(t: &SetTypeValue<'_>) -> String {
    let name = |t: &SetType| {
        serde_json::to_value(t)
            .ok()
            .and_then(|v| v.as_str().map(String::from))
            .unwrap_or_default()
    };
    match t {
        SetTypeValue::Single(t) => name(t),
        SetTypeValue::Concatenated(ts) => ts.iter().map(name).collect::<Vec<_>>().join(" . "),
    }
}

fn is_verdict_map(values: &SetTypeValue<'_>) -> bool {
    matches!(values, SetTypeValue::Single(SetType::Mark))
}

/// Table `family name` as the kernel has it (`nft -j list table`).
pub fn list_table(family: NfFamily, name: &str) -> Result<Listing, NftError> {
    let f = family_name(family);
    list(&["list", "table", f, name]).map_err(|e| match e {
        NftError::List { error, .. } if error.contains("No such file or directory") => {
            NftError::NoTable {
                family: f,
                name: name.to_string(),
            }
        }
        e => e,
    })
}

/// Chain `chain` of table `family table` (`nft -j list chain`); [`NftError::NoTable`] when
/// the chain or its table is not there.
pub fn list_chain(family: NfFamily, table: &str, chain: &str) -> Result<Listing, NftError> {
    let f = family_name(family);
    list(&["list", "chain", f, table, chain]).map_err(|e| match e {
        NftError::List { error, .. } if error.contains("No such file or directory") => {
            NftError::NoTable {
                family: f,
                name: table.to_string(),
            }
        }
        e => e,
    })
}

/// The whole ruleset (`nft -j list ruleset`).
pub fn list_ruleset() -> Result<Listing, NftError> {
    list(&["list", "ruleset"])
}

fn list(args: &[&str]) -> Result<Listing, NftError> {
    let out = Command::new("nft")
        .arg("-j")
        .args(args)
        .output()
        .map_err(NftError::Spawn)?;
    if !out.status.success() {
        return Err(NftError::List {
            what: args[1..].join(" "),
            error: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Listing::parse(&out.stdout).map_err(NftError::Parse)
}

#[cfg(test)]
mod tests {
    use nftables::{
        schema::{Map, Rule},
        types::NfFamily,
    };

    use super::*;

    #[test]
    fn verdict_maps_and_notrack_are_spelt_as_nft_reads_them() {
        let map = Map {
            family: NfFamily::INet,
            table: "t".into(),
            name: "m".into(),
            handle: None,
            set_type: SetTypeValue::Single(SetType::Ipv4Addr),
            map: SetTypeValue::Single(SetType::Mark),
            policy: None,
            flags: None,
            elem: None,
            timeout: None,
            gc_interval: None,
            size: None,
            comment: None,
        };
        let mut b = Batch::new();
        b.add(NfListObject::Map(Box::new(map.clone())));
        b.add_cmd(NfCmd::Flush(FlushObject::Map(Box::new(map))));
        b.add(NfListObject::Rule(Rule {
            family: NfFamily::INet,
            table: "t".into(),
            chain: "c".into(),
            expr: vec![Statement::Notrack, Statement::Accept(None)].into(),
            ..Rule::default()
        }));
        let v = encode(b).json;
        assert_eq!(v["nftables"][0]["add"]["map"]["map"], "verdict");
        assert_eq!(v["nftables"][1]["flush"]["map"]["map"], "verdict");
        assert_eq!(
            v["nftables"][2]["add"]["rule"]["expr"],
            serde_json::json!([{ "notrack": null }, { "accept": null }])
        );
    }
}
