//! Where the workspace and its target directory are, and how to run cargo in it.

use std::{
    env,
    ffi::OsString,
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

use crate::process;

/// The l3lb workspace: its root and the cargo that runs xtask.
pub struct Workspace {
    /// The directory holding the workspace's `Cargo.toml`.
    pub root: PathBuf,
    /// The cargo that runs xtask (`$CARGO`), so nested builds use the same toolchain.
    cargo: OsString,
}

impl Workspace {
    /// Finds the workspace root: the parent of xtask's manifest directory, taken from the
    /// environment cargo sets when running xtask, else from the one xtask was built in.
    pub fn locate() -> Result<Self> {
        let candidates = [
            env::var_os("CARGO_MANIFEST_DIR").map(PathBuf::from),
            Some(PathBuf::from(env!("CARGO_MANIFEST_DIR"))),
        ];
        let root = candidates
            .iter()
            .flatten()
            .filter_map(|xtask_dir| xtask_dir.parent())
            .find(|dir| is_workspace_root(dir))
            .with_context(|| {
                format!(
                    "could not find the l3lb workspace root (a Cargo.toml with [workspace] \
                     above xtask/); looked above {}; run xtask as `cargo xtask` from the repository",
                    candidates
                        .iter()
                        .flatten()
                        .map(|dir| dir.display().to_string())
                        .collect::<Vec<_>>()
                        .join(" and ")
                )
            })?
            .to_path_buf();
        let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        Ok(Self { root, cargo })
    }

    /// A `cargo` command (the toolchain running xtask) working in the workspace root.
    pub fn cargo(&self) -> Command {
        let mut cmd = Command::new(&self.cargo);
        cmd.current_dir(&self.root);
        cmd
    }

    /// A nightly `cargo` command working in the workspace root. Goes through `rustup run`
    /// rather than `cargo +nightly`, which would need rustup's cargo proxy first on PATH.
    pub fn nightly_cargo(&self) -> Command {
        let mut cmd = Command::new("rustup");
        cmd.args(["run", "nightly", "cargo"])
            .current_dir(&self.root);
        cmd
    }

    /// The target directory as cargo sees it (`build.target-dir`, `CARGO_TARGET_DIR`),
    /// from `cargo metadata`; falls back to `CARGO_TARGET_DIR` or `<root>/target` when
    /// cargo metadata cannot tell.
    pub fn target_dir(&self) -> PathBuf {
        let mut cmd = self.cargo();
        cmd.args(["metadata", "--format-version", "1", "--no-deps"]);
        let from_metadata = process::stdout_of(&mut cmd).and_then(|json| {
            json_string_field(&json, "target_directory")
                .context("`cargo metadata` output has no \"target_directory\"")
        });
        match from_metadata {
            Ok(dir) => PathBuf::from(dir),
            Err(err) => {
                let fallback = env::var_os("CARGO_TARGET_DIR")
                    .map_or_else(|| self.root.join("target"), |dir| self.root.join(dir));
                eprintln!(
                    "warning: using target directory {}: {err:#}",
                    fallback.display()
                );
                fallback
            }
        }
    }
}

/// Whether `dir` holds a `Cargo.toml` declaring a workspace that contains xtask.
fn is_workspace_root(dir: &Path) -> bool {
    dir.join("xtask/Cargo.toml").is_file()
        && fs::read_to_string(dir.join("Cargo.toml"))
            .is_ok_and(|manifest| manifest.lines().any(|line| line.trim() == "[workspace]"))
}

/// The string value of the first `"field": "…"` in a JSON document: enough for
/// `cargo metadata`'s top-level `target_directory`, without a JSON parser.
fn json_string_field(json: &str, field: &str) -> Result<String> {
    let key = format!("\"{field}\"");
    let Some(at) = json.find(&key) else {
        bail!("no \"{field}\" in the JSON");
    };
    let rest = json[at + key.len()..].trim_start();
    let Some(rest) = rest.strip_prefix(':').map(str::trim_start) else {
        bail!("\"{field}\" is not followed by `:`");
    };
    let Some(rest) = rest.strip_prefix('"') else {
        bail!("\"{field}\" is not a string");
    };
    let mut value = String::new();
    let mut chars = rest.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => return Ok(value),
            '\\' => match chars.next() {
                Some(c @ ('"' | '\\' | '/')) => value.push(c),
                Some('b') => value.push('\u{8}'),
                Some('f') => value.push('\u{c}'),
                Some('n') => value.push('\n'),
                Some('r') => value.push('\r'),
                Some('t') => value.push('\t'),
                Some('u') => {
                    let hex: String = chars.by_ref().take(4).collect();
                    let c = u32::from_str_radix(&hex, 16)
                        .ok()
                        .and_then(char::from_u32)
                        .with_context(|| format!("unsupported escape \\u{hex} in \"{field}\""))?;
                    value.push(c);
                }
                other => bail!("bad escape {other:?} in \"{field}\""),
            },
            c => value.push(c),
        }
    }
    bail!("\"{field}\" is an unterminated string")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_target_directory_from_cargo_metadata() -> Result<()> {
        let json = r#"{"packages":[],"target_directory":"/work/main/target","version":1}"#;
        assert_eq!(
            json_string_field(json, "target_directory")?,
            "/work/main/target"
        );
        Ok(())
    }

    #[test]
    fn unescapes_json_strings() -> Result<()> {
        let json = r#"{"target_directory" : "/a \"b\"\\c\u00e9"}"#;
        assert_eq!(json_string_field(json, "target_directory")?, "/a \"b\"\\cé");
        Ok(())
    }

    #[test]
    fn reports_a_missing_field() {
        assert!(json_string_field("{}", "target_directory").is_err());
        assert!(json_string_field(r#"{"target_directory":"/x"#, "target_directory").is_err());
    }

    #[test]
    fn finds_this_workspace() -> Result<()> {
        let workspace = Workspace::locate()?;
        assert!(workspace.root.join("xtask").is_dir());
        Ok(())
    }
}
