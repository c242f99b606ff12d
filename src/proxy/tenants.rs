//! The tenants file of `claude-proxy`: who may use the proxy, and as which [`Tenant`].
//!
//! One `[[tenant]]` table per team; a client presents one of its tokens (as `x-api-key` or
//! `Authorization: Bearer`) and its requests carry that [`Tenant`] through every layer:
//!
//! ```toml
//! [[tenant]]
//! name = "web"
//! tokens = ["tok-web-1"]
//! weight = 3
//! priority = "interactive"
//! [tenant.limits."claude-opus-4"]
//! rpm = 30
//! itpm = 20000
//! otpm = 4000
//! [tenant.budget]
//! usd_per_day = 20.0
//! usd_per_month = 400.0
//!
//! [[tenant]]
//! name = "batch-jobs"
//! # BLAKE3 of the token (`printf %s "$TOKEN" | b3sum`): the secret need not sit in the file.
//! token_hashes = ["2f1f8e6f6b4c1a1f2c64a3c0c7c6b0f4b4e4f1d1d0f8a0b0c9d8e7f6a5b4c3d2"]
//! priority = "batch"
//! ```
//!
//! Tokens are kept only as BLAKE3 digests, compared in constant time; a tenant's name is what
//! the status page, the metrics and the logs show.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::Path;

use serde::Deserialize;

use crate::quota::Limits;
use crate::tenant::{Budget, Priority, Tenant};

/// Longest tenant name accepted (it becomes a metric label and a cache partition).
const MAX_NAME: usize = 64;

/// What went wrong with a tenants file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum TenantsErrorKind {
    /// The file cannot be read.
    Read,
    /// Not TOML, or an unknown field, or a value of the wrong type.
    Syntax,
    /// Two tenants share a name or a token.
    Duplicate,
    /// A value out of range: zero weight, unknown priority, negative budget, bad hash...
    Invalid,
}

/// A tenants file refused, naming the tenant (by index and name) and the field at fault:
/// `tenant[2] "batch-jobs": weight: must be at least 1`. Never contains a token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TenantsError {
    kind: TenantsErrorKind,
    field: String,
    message: String,
}

impl TenantsError {
    fn new(kind: TenantsErrorKind, field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            kind,
            field: field.into(),
            message: message.into(),
        }
    }

    /// What kind of error.
    pub fn kind(&self) -> TenantsErrorKind {
        self.kind
    }

    /// Where: `tenant[2] "batch-jobs": weight`, or the file's path when the whole file is at
    /// fault.
    pub fn field(&self) -> &str {
        &self.field
    }
}

impl fmt::Display for TenantsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

impl std::error::Error for TenantsError {}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    tenant: Vec<toml::Table>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTenant {
    name: String,
    #[serde(default)]
    tokens: Vec<String>,
    #[serde(default)]
    token_hashes: Vec<String>,
    weight: Option<i64>,
    priority: Option<String>,
    #[serde(default)]
    admin: bool,
    #[serde(default)]
    limits: BTreeMap<String, RawLimits>,
    budget: Option<RawBudget>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    rpm: i64,
    itpm: i64,
    otpm: i64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBudget {
    usd_per_day: Option<f64>,
    usd_per_month: Option<f64>,
}

/// The tenants of a tenants file, looked up by token.
///
/// ```
/// use tower_claude::proxy::TenantTable;
/// use tower_claude::tenant::Priority;
///
/// let table = TenantTable::parse(r#"
/// [[tenant]]
/// name = "web"
/// tokens = ["tok-web"]
/// weight = 3
///
/// [[tenant]]
/// name = "batch-jobs"
/// token_hashes = ["8a1b3d0e2f3c1e5f7a9b2c4d6e8f0a1b3c5d7e9f1a2b4c6d8e0f2a4b6c8d0e2f"]
/// priority = "batch"
/// "#).unwrap();
/// let web = table.authenticate("tok-web").unwrap();
/// assert_eq!((web.name(), web.weight_value()), ("web", 3));
/// assert!(table.authenticate("tok-nobody").is_none());
/// assert_eq!(table.get("batch-jobs").unwrap().priority_class(), Priority::Batch);
///
/// let err = TenantTable::parse("[[tenant]]\nname = \"x\"\ntokens = [\"t\"]\nweight = 0\n")
///     .unwrap_err();
/// assert_eq!(err.to_string(), r#"tenant[0] "x": weight: must be at least 1"#);
/// ```
#[derive(Clone, Default)]
pub struct TenantTable {
    tenants: Vec<Tenant>,
    /// BLAKE3 digest of each token, with the index of its tenant.
    digests: Vec<(blake3::Hash, usize)>,
}

impl fmt::Debug for TenantTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Names only: digests of tokens are not shown either.
        f.debug_struct("TenantTable")
            .field(
                "tenants",
                &self.tenants.iter().map(Tenant::name).collect::<Vec<_>>(),
            )
            .field("tokens", &self.digests.len())
            .finish()
    }
}

impl TenantTable {
    /// Reads and validates a tenants file.
    pub fn read(path: &Path) -> Result<Self, TenantsError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            TenantsError::new(
                TenantsErrorKind::Read,
                path.display().to_string(),
                format!("cannot read the tenants file: {e}"),
            )
        })?;
        Self::parse(&text).map_err(|mut e| {
            if e.kind == TenantsErrorKind::Syntax && !e.field.starts_with("tenant[") {
                e.field = format!("{}: {}", path.display(), e.field);
            }
            e
        })
    }

    /// Parses and validates the text of a tenants file.
    pub fn parse(text: &str) -> Result<Self, TenantsError> {
        let raw: RawFile = toml::from_str(text).map_err(|e| {
            let line = e.span().map(|s| text[..s.start].lines().count().max(1));
            TenantsError::new(
                TenantsErrorKind::Syntax,
                match line {
                    Some(line) => format!("line {line}"),
                    None => "tenants file".to_owned(),
                },
                e.message().trim().to_owned(),
            )
        })?;
        let mut table = TenantTable::default();
        let mut names: BTreeMap<String, usize> = BTreeMap::new();
        for (index, entry) in raw.tenant.into_iter().enumerate() {
            let shown_name = entry
                .get("name")
                .and_then(|v| v.as_str())
                .map(|n| format!(" {n:?}"))
                .unwrap_or_default();
            let at = |field: &str| format!("tenant[{index}]{shown_name}: {field}");
            let raw = RawTenant::deserialize(toml::Value::Table(entry)).map_err(|e| {
                // serde names the field in its message ("unknown field `wieght`, expected ...").
                TenantsError::new(
                    TenantsErrorKind::Syntax,
                    format!("tenant[{index}]{shown_name}"),
                    e.message().trim().to_owned(),
                )
            })?;
            let invalid = |field: &str, msg: String| {
                TenantsError::new(TenantsErrorKind::Invalid, at(field), msg)
            };
            if raw.name.is_empty()
                || raw.name.len() > MAX_NAME
                || !raw
                    .name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'@'))
            {
                return Err(invalid(
                    "name",
                    format!(
                        "must be 1 to {MAX_NAME} characters of letters, digits, `-`, `_`, `.`, `@`"
                    ),
                ));
            }
            if let Some(first) = names.insert(raw.name.clone(), index) {
                return Err(TenantsError::new(
                    TenantsErrorKind::Duplicate,
                    at("name"),
                    format!("the same name as tenant[{first}]"),
                ));
            }
            let weight = match raw.weight {
                None => 1,
                Some(w) if w < 1 => return Err(invalid("weight", "must be at least 1".into())),
                Some(w) => u32::try_from(w)
                    .map_err(|_| invalid("weight", format!("must be at most {}", u32::MAX)))?,
            };
            let priority = match raw.priority.as_deref() {
                None | Some("interactive") => Priority::Interactive,
                Some("batch") => Priority::Batch,
                Some(other) => {
                    return Err(invalid(
                        "priority",
                        format!("`{other}` is not one of interactive, batch"),
                    ));
                }
            };
            let mut tenant = Tenant::new(raw.name.as_str())
                .weight(weight)
                .priority(priority)
                .admin(raw.admin);
            for (group, l) in &raw.limits {
                let mut values = [0u64; 3];
                for (slot, (unit, v)) in
                    values
                        .iter_mut()
                        .zip([("rpm", l.rpm), ("itpm", l.itpm), ("otpm", l.otpm)])
                {
                    *slot = u64::try_from(v).ok().filter(|v| *v >= 1).ok_or_else(|| {
                        invalid(
                            &format!("limits.{group}.{unit}"),
                            "must be at least 1".into(),
                        )
                    })?;
                }
                tenant = tenant.limit(group.as_str(), Limits::new(values[0], values[1], values[2]));
            }
            if let Some(b) = &raw.budget {
                let mut budget = Budget::default();
                for (field, value) in [
                    ("usd_per_day", b.usd_per_day),
                    ("usd_per_month", b.usd_per_month),
                ] {
                    let Some(usd) = value else { continue };
                    if !usd.is_finite() || usd < 0.0 {
                        return Err(invalid(
                            &format!("budget.{field}"),
                            "must be a non-negative number of US dollars".into(),
                        ));
                    }
                    budget = if field == "usd_per_day" {
                        budget.per_day(usd)
                    } else {
                        budget.per_month(usd)
                    };
                }
                tenant = tenant.budget(budget);
            }
            if raw.tokens.is_empty() && raw.token_hashes.is_empty() {
                return Err(invalid(
                    "tokens",
                    "a tenant needs at least one entry in `tokens` or `token_hashes`".into(),
                ));
            }
            let mut digests = Vec::new();
            for (i, token) in raw.tokens.iter().enumerate() {
                if token.trim().is_empty() || token.trim() != token {
                    return Err(invalid(
                        &format!("tokens[{i}]"),
                        "must be non-empty, without surrounding spaces".into(),
                    ));
                }
                digests.push((format!("tokens[{i}]"), blake3::hash(token.as_bytes())));
            }
            for (i, hex) in raw.token_hashes.iter().enumerate() {
                let digest = blake3::Hash::from_hex(hex.trim()).map_err(|_| {
                    invalid(
                        &format!("token_hashes[{i}]"),
                        "must be 64 hex digits (the BLAKE3 hash of a token)".into(),
                    )
                })?;
                digests.push((format!("token_hashes[{i}]"), digest));
            }
            for (field, digest) in digests {
                if let Some((_, owner)) = table.digests.iter().find(|(d, _)| *d == digest) {
                    let owner = &table
                        .tenants
                        .get(*owner)
                        .map(Tenant::name)
                        .unwrap_or(&raw.name);
                    return Err(TenantsError::new(
                        TenantsErrorKind::Duplicate,
                        at(&field),
                        if *owner == raw.name {
                            "the same token twice".to_owned()
                        } else {
                            format!("the same token as tenant {owner:?}")
                        },
                    ));
                }
                table.digests.push((digest, index));
            }
            table.tenants.push(tenant);
        }
        Ok(table)
    }

    /// The tenant that holds `token`, if any. Every digest is compared, in constant time,
    /// whichever matches.
    pub fn authenticate(&self, token: &str) -> Option<&Tenant> {
        let presented = blake3::hash(token.as_bytes());
        let mut found = None;
        for (digest, index) in &self.digests {
            // `blake3::Hash`'s equality is constant-time; no early exit either.
            if *digest == presented {
                found = Some(*index);
            }
        }
        found.and_then(|i| self.tenants.get(i))
    }

    /// The tenant named `name`.
    pub fn get(&self, name: &str) -> Option<&Tenant> {
        self.tenants.iter().find(|t| t.name() == name)
    }

    /// Every tenant, in file order.
    pub fn tenants(&self) -> &[Tenant] {
        &self.tenants
    }

    /// This table with the running counters of `old` kept for every tenant that keeps its
    /// name, and what changed between the two.
    pub fn carry_over(mut self, old: &TenantTable) -> (Self, TenantsReload) {
        let mut report = TenantsReload::default();
        let tokens_of = |table: &TenantTable, index: usize| -> BTreeSet<[u8; 32]> {
            table
                .digests
                .iter()
                .filter(|(_, i)| *i == index)
                .map(|(d, _)| *d.as_bytes())
                .collect()
        };
        for index in 0..self.tenants.len() {
            let name = self.tenants[index].name().to_owned();
            match old.tenants.iter().position(|t| t.name() == name) {
                Some(old_index) => {
                    let before = &old.tenants[old_index];
                    let after = self.tenants[index]
                        .clone()
                        .with_stats(before.stats().clone());
                    let same = before.weight_value() == after.weight_value()
                        && before.priority_class() == after.priority_class()
                        && before.limits() == after.limits()
                        && before.budget_value() == after.budget_value()
                        && before.is_admin() == after.is_admin()
                        && tokens_of(old, old_index) == tokens_of(&self, index);
                    if same {
                        report.unchanged += 1;
                    } else {
                        report.changed.push(name);
                    }
                    self.tenants[index] = after;
                }
                None => report.added.push(name),
            }
        }
        report.removed = old
            .tenants
            .iter()
            .filter(|t| self.get(t.name()).is_none())
            .map(|t| t.name().to_owned())
            .collect();
        (self, report)
    }
}

/// What a reload of the tenants file changed (tenant names only).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct TenantsReload {
    /// Tenants new in the file.
    pub added: Vec<String>,
    /// Tenants no longer in the file (their tokens are refused from now on).
    pub removed: Vec<String>,
    /// Tenants whose tokens, weight, priority, limits, budget or admin flag changed.
    pub changed: Vec<String>,
    /// Tenants as they were.
    pub unchanged: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    const TWO: &str = r#"
[[tenant]]
name = "web"
tokens = ["tok-web", "tok-web-2"]
weight = 3
admin = true
[tenant.limits."claude-opus-4"]
rpm = 30
itpm = 20000
otpm = 4000
[tenant.budget]
usd_per_day = 20.0
usd_per_month = 400

[[tenant]]
name = "batch-jobs"
tokens = ["tok-batch"]
priority = "batch"
"#;

    #[test]
    fn every_field_is_read() {
        let table = TenantTable::parse(TWO).unwrap();
        let web = table.authenticate("tok-web-2").unwrap();
        assert_eq!(web.name(), "web");
        assert_eq!(web.weight_value(), 3);
        assert!(web.is_admin());
        assert_eq!(
            web.limit_for("claude-opus-4"),
            Some(Limits::new(30, 20_000, 4_000))
        );
        assert_eq!(
            web.budget_value(),
            Budget::default().per_day(20.0).per_month(400.0)
        );
        let batch = table.authenticate("tok-batch").unwrap();
        assert_eq!(batch.priority_class(), Priority::Batch);
        assert_eq!(batch.weight_value(), 1);
        assert!(!batch.is_admin());
        assert!(table.authenticate("tok-web-3").is_none());
        assert!(table.authenticate("").is_none());
    }

    #[test]
    fn token_hashes_authenticate_without_the_token_in_the_file() {
        let hex = blake3::hash(b"tok-secret").to_hex();
        let table = TenantTable::parse(&format!(
            "[[tenant]]\nname = \"ops\"\ntoken_hashes = [\"{hex}\"]\n"
        ))
        .unwrap();
        assert_eq!(table.authenticate("tok-secret").unwrap().name(), "ops");
        assert!(table.authenticate(&hex).is_none());
    }

    #[test]
    fn tokens_never_show_in_debug() {
        let table = TenantTable::parse(TWO).unwrap();
        let shown = format!("{table:?} {:?}", table.tenants());
        assert!(!shown.contains("tok-"), "{shown}");
        assert!(shown.contains("batch-jobs"));
    }

    fn refused(text: &str) -> TenantsError {
        TenantTable::parse(text).unwrap_err()
    }

    #[test]
    fn each_bad_value_names_its_tenant_and_field() {
        let base = "[[tenant]]\nname = \"a\"\ntokens = [\"t-a\"]\n[[tenant]]\nname = \"batch-jobs\"\ntokens = [\"t-b\"]\n";
        let cases: &[(&str, TenantsErrorKind, &str)] = &[
            (
                "weight = 0\n",
                TenantsErrorKind::Invalid,
                r#"tenant[1] "batch-jobs": weight: must be at least 1"#,
            ),
            (
                "weight = -2\n",
                TenantsErrorKind::Invalid,
                r#"tenant[1] "batch-jobs": weight: must be at least 1"#,
            ),
            (
                "priority = \"urgent\"\n",
                TenantsErrorKind::Invalid,
                r#"tenant[1] "batch-jobs": priority: `urgent` is not one of interactive, batch"#,
            ),
            ("wieght = 2\n", TenantsErrorKind::Syntax, "wieght"),
            (
                "[tenant.budget]\nusd_per_day = -1.0\n",
                TenantsErrorKind::Invalid,
                r#"tenant[1] "batch-jobs": budget.usd_per_day: must be a non-negative"#,
            ),
            (
                "[tenant.budget]\nusd_per_week = 1.0\n",
                TenantsErrorKind::Syntax,
                "usd_per_week",
            ),
            (
                "[tenant.limits.claude-opus-4]\nrpm = 0\nitpm = 1\notpm = 1\n",
                TenantsErrorKind::Invalid,
                r#"tenant[1] "batch-jobs": limits.claude-opus-4.rpm: must be at least 1"#,
            ),
            (
                "token_hashes = [\"abc\"]\n",
                TenantsErrorKind::Invalid,
                r#"tenant[1] "batch-jobs": token_hashes[0]: must be 64 hex"#,
            ),
        ];
        for (extra, kind, expected) in cases {
            let err = refused(&format!("{base}{extra}"));
            assert_eq!(err.kind(), *kind, "{extra}: {err}");
            assert!(err.to_string().contains(expected), "{extra}: {err}");
            if *kind == TenantsErrorKind::Syntax {
                assert!(
                    err.to_string().starts_with(r#"tenant[1] "batch-jobs""#),
                    "{err}"
                );
            }
        }
    }

    #[test]
    fn duplicates_are_refused_without_showing_the_token() {
        let err = refused(
            "[[tenant]]\nname = \"a\"\ntokens = [\"t\"]\n[[tenant]]\nname = \"a\"\ntokens = [\"u\"]\n",
        );
        assert_eq!(err.kind(), TenantsErrorKind::Duplicate);
        assert_eq!(
            err.to_string(),
            r#"tenant[1] "a": name: the same name as tenant[0]"#
        );
        let hex = blake3::hash(b"t").to_hex();
        let err = refused(&format!(
            "[[tenant]]\nname = \"a\"\ntokens = [\"t\"]\n[[tenant]]\nname = \"b\"\ntoken_hashes = [\"{hex}\"]\n"
        ));
        assert_eq!(err.kind(), TenantsErrorKind::Duplicate);
        assert_eq!(
            err.to_string(),
            r#"tenant[1] "b": token_hashes[0]: the same token as tenant "a""#
        );
        let err = refused("[[tenant]]\nname = \"a\"\ntokens = [\"t\", \"t\"]\n");
        assert_eq!(
            err.to_string(),
            r#"tenant[0] "a": tokens[1]: the same token twice"#
        );
    }

    #[test]
    fn missing_tokens_names_and_unknown_tables_are_refused() {
        assert_eq!(
            refused("[[tenant]]\nname = \"a\"\n").field(),
            r#"tenant[0] "a": tokens"#
        );
        assert!(
            refused("[[tenant]]\ntokens = [\"t\"]\n")
                .to_string()
                .contains("name")
        );
        assert_eq!(
            refused("[[tenant]]\nname = \"a b\"\ntokens = [\"t\"]\n").field(),
            r#"tenant[0] "a b": name"#
        );
        let err = refused("[[tenants]]\nname = \"a\"\n");
        assert_eq!(err.kind(), TenantsErrorKind::Syntax);
        assert!(
            err.to_string().contains("line 1") && err.to_string().contains("tenants"),
            "{err}"
        );
    }

    #[test]
    fn a_reload_keeps_counters_of_tenants_that_keep_their_name() {
        let old = TenantTable::parse(TWO).unwrap();
        old.get("web").unwrap().stats().record_request();
        let new = TenantTable::parse(
            "[[tenant]]\nname = \"web\"\ntokens = [\"tok-web\", \"tok-web-2\"]\nweight = 5\nadmin = true\n\
             [tenant.limits.\"claude-opus-4\"]\nrpm = 30\nitpm = 20000\notpm = 4000\n\
             [[tenant]]\nname = \"ml\"\ntokens = [\"tok-ml\"]\n",
        )
        .unwrap();
        let (new, report) = new.carry_over(&old);
        assert_eq!(new.get("web").unwrap().stats().requests(), 1);
        assert_eq!(new.get("web").unwrap().weight_value(), 5);
        assert_eq!(report.added, ["ml"]);
        assert_eq!(report.removed, ["batch-jobs"]);
        assert_eq!(report.changed, ["web"]);
        let (_, again) = TenantTable::parse(TWO)
            .unwrap()
            .carry_over(&TenantTable::parse(TWO).unwrap());
        assert_eq!(again.unchanged, 2);
        assert!(again.changed.is_empty());
    }
}
