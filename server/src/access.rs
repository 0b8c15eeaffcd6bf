//! Who may do what: API keys with scopes, the admin key, and the [`Caller`]
//! every request is resolved to.
//!
//! - An ordinary API key (`--api-key`, or a line of `--api-key-file` without
//!   scopes) may use the API and read experience libraries.
//! - A key with scope `experiences:write` may also change libraries (items,
//!   rollbacks, learn jobs and their cancellation).
//! - The admin key (`--admin-key`), or a key with scope `admin`, may do all
//!   of that and use the `/admin` API.
//! - With no key of any kind configured, everything but `/admin` is open
//!   (local use).
//!
//! A caller is recorded by a hash of its key ([`key_id`]), never the key:
//! in the versions it writes and as the owner of the completions it may rate.

use std::convert::Infallible;
use std::net::IpAddr;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use sha2::{Digest, Sha256};

use crate::errors::ApiError;

/// A permission a key can carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Change experience libraries.
    ExperiencesWrite,
    /// Everything the admin key may do.
    Admin,
}

impl Scope {
    /// Every scope.
    pub const ALL: [Scope; 2] = [Scope::ExperiencesWrite, Scope::Admin];

    /// The name used in key files and error messages.
    pub fn name(self) -> &'static str {
        match self {
            Scope::ExperiencesWrite => "experiences:write",
            Scope::Admin => "admin",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|x| x.name() == s)
    }
}

/// An API key and its scopes.
#[derive(Clone)]
struct ApiKey {
    secret: String,
    scopes: Vec<Scope>,
}

impl std::fmt::Debug for ApiKey {
    // Never print a key (logs, panics).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiKey").field("id", &key_id(&self.secret)).field("scopes", &self.scopes).finish()
    }
}

/// How a key is named where it must not appear: `key:` and the first 16 hex
/// digits of a SHA-256 of the key (64 bits: distinct for any real set of
/// keys, and useless for logging in).
pub fn key_id(secret: &str) -> String {
    let digest = Sha256::new().chain_update(b"ouro key id\0").chain_update(secret.as_bytes()).finalize();
    let hex: String = digest.iter().take(8).map(|b| format!("{b:02x}")).collect();
    format!("key:{hex}")
}

/// Parses an `--api-key-file`: one key a line, optionally followed by
/// `scopes=a,b`; blank lines and `#` comments are skipped. Errors name the
/// line, never the key.
pub fn parse_key_file(text: &str) -> Result<Vec<(String, Vec<Scope>)>, String> {
    let mut keys = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut words = line.split_whitespace();
        let Some(key) = words.next() else { continue };
        let mut scopes = Vec::new();
        for w in words {
            let Some(list) = w.strip_prefix("scopes=") else {
                return Err(format!("line {}: expected `KEY` or `KEY scopes=experiences:write,admin`, found `{w}` after the key", i + 1));
            };
            for name in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                let scope = Scope::parse(name)
                    .ok_or_else(|| format!("line {}: unknown scope `{name}` (known: {})", i + 1, Scope::ALL.map(Scope::name).join(", ")))?;
                if !scopes.contains(&scope) {
                    scopes.push(scope);
                }
            }
        }
        keys.push((key.to_string(), scopes));
    }
    Ok(keys)
}

/// Every credential the server accepts.
#[derive(Debug, Clone, Default)]
pub struct KeyRing {
    keys: Vec<ApiKey>,
    admin: Option<String>,
}

/// What a request's bearer token turned out to be.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Credential {
    /// No `Authorization: Bearer`.
    Missing,
    /// A token that is no key of this server.
    Invalid,
    /// An API key (its id and scopes).
    Key { id: String, scopes: Vec<Scope> },
    /// The admin key.
    Admin,
}

/// Compares in time independent of where the strings first differ.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = a.len() ^ b.len();
    for i in 0..a.len().max(b.len()) {
        diff |= (a.get(i).copied().unwrap_or(0) ^ b.get(i).copied().unwrap_or(0)) as usize;
    }
    diff == 0
}

impl KeyRing {
    /// A ring of `keys` (with their scopes) and the admin key. Empty keys
    /// are dropped.
    pub fn new(keys: Vec<(String, Vec<Scope>)>, admin: Option<String>) -> Self {
        let keys = keys.into_iter().filter(|(k, _)| !k.is_empty()).map(|(secret, scopes)| ApiKey { secret, scopes }).collect();
        Self { keys, admin: admin.filter(|a| !a.is_empty()) }
    }

    /// Whether API keys are configured (then the API needs one).
    pub fn has_api_keys(&self) -> bool {
        !self.keys.is_empty()
    }

    /// API keys configured.
    pub fn api_keys(&self) -> usize {
        self.keys.len()
    }

    /// Whether no credential at all is configured: everything but `/admin`
    /// is open, for local use.
    pub fn is_open(&self) -> bool {
        self.keys.is_empty() && self.admin.is_none()
    }

    /// Whether anything may use the admin API.
    pub fn admin_enabled(&self) -> bool {
        self.admin.is_some() || self.keys.iter().any(|k| k.scopes.contains(&Scope::Admin))
    }

    fn credential(&self, bearer: Option<&str>) -> Credential {
        let Some(given) = bearer else { return Credential::Missing };
        let given_b = given.as_bytes();
        if given_b.is_empty() {
            return Credential::Invalid;
        }
        // Every key is compared (no early exit), each in constant time.
        let admin = self.admin.as_deref().is_some_and(|a| constant_time_eq(given_b, a.as_bytes()));
        let mut matched = false;
        let mut scopes: Vec<Scope> = Vec::new();
        for k in &self.keys {
            if constant_time_eq(given_b, k.secret.as_bytes()) {
                matched = true;
                for s in &k.scopes {
                    if !scopes.contains(s) {
                        scopes.push(*s);
                    }
                }
            }
        }
        match (admin, matched) {
            (true, _) => Credential::Admin,
            (false, true) => Credential::Key { id: key_id(given), scopes },
            (false, false) => Credential::Invalid,
        }
    }

    /// The caller sending `bearer`.
    pub fn caller(&self, bearer: Option<&str>) -> Caller {
        Caller { credential: self.credential(bearer), open: self.is_open(), admin_enabled: self.admin_enabled() }
    }

    /// The warning to give when the server listens on `ip` with this ring:
    /// `None` on loopback, or when API keys guard the API.
    pub fn exposure_warning(&self, ip: IpAddr) -> Option<String> {
        if ip.is_loopback() || self.has_api_keys() {
            return None;
        }
        Some(if self.admin.is_none() {
            format!(
                "listening on {ip} (not loopback) without API keys or an admin key: anyone who reaches the port can use the API \
                 and change the experience libraries rendered into every client's prompt; start with --api-key/--api-key-file and --admin-key"
            )
        } else {
            format!(
                "listening on {ip} (not loopback) without API keys: anyone who reaches the port can use the API \
                 (experience library writes need the admin key); start with --api-key or --api-key-file"
            )
        })
    }
}

/// Who sent a request, as the API-key layer resolved it (a request that
/// did not pass that layer is a caller of an open server).
#[derive(Debug, Clone)]
pub struct Caller {
    credential: Credential,
    open: bool,
    admin_enabled: bool,
}

impl Caller {
    /// A caller of a server without keys.
    pub fn open() -> Self {
        Self { credential: Credential::Missing, open: true, admin_enabled: false }
    }

    /// Whether it sent a key of this server (an API key or the admin key).
    pub fn is_authenticated(&self) -> bool {
        matches!(self.credential, Credential::Key { .. } | Credential::Admin)
    }

    /// Whether it sent a bearer token at all.
    pub fn sent_a_key(&self) -> bool {
        self.credential != Credential::Missing
    }

    /// Its stable id when it sent a valid key: `admin` or `key:<hash>`.
    pub fn owner(&self) -> Option<String> {
        match &self.credential {
            Credential::Admin => Some("admin".into()),
            Credential::Key { id, .. } => Some(id.clone()),
            _ => None,
        }
    }

    /// How the versions it writes record it: its [`owner`](Self::owner), or
    /// `anonymous`.
    pub fn actor(&self) -> String {
        self.owner().unwrap_or_else(|| "anonymous".into())
    }

    fn has(&self, scope: Scope) -> bool {
        match &self.credential {
            Credential::Admin => true,
            Credential::Key { scopes, .. } => scopes.contains(&scope) || scopes.contains(&Scope::Admin),
            _ => false,
        }
    }

    /// Ok when it may do what `scope` allows; else 401 (no or no valid key)
    /// or 403 naming the scope (a valid key without it). `what` says what
    /// was refused.
    pub fn require(&self, scope: Scope, what: &str) -> Result<(), ApiError> {
        if self.has(scope) || (self.open && scope != Scope::Admin) {
            return Ok(());
        }
        match &self.credential {
            Credential::Missing => Err(ApiError::Unauthorized(format!(
                "{what} needs the admin key or an API key with scope `{}`: send `Authorization: Bearer <key>`",
                scope.name()
            ))),
            Credential::Invalid => Err(ApiError::Unauthorized("the API key is not valid".into())),
            _ => Err(ApiError::MissingScope {
                scope: scope.name(),
                message: format!("{what} needs the admin key or an API key with scope `{}`; this key lacks it", scope.name()),
            }),
        }
    }

    /// Ok for the admin key or a key with scope `admin`; 403 when the admin
    /// API is disabled or the key lacks the scope, 401 without a valid key.
    pub fn require_admin(&self) -> Result<(), ApiError> {
        if !self.admin_enabled {
            return Err(ApiError::Forbidden("the admin API is disabled: start ouro with --admin-key".into()));
        }
        match &self.credential {
            Credential::Missing | Credential::Invalid => {
                Err(ApiError::Unauthorized("a valid admin key is required (Authorization: Bearer <admin key>)".into()))
            }
            _ => self.require(Scope::Admin, "the admin API"),
        }
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(parts.extensions.get::<Caller>().cloned().unwrap_or_else(Caller::open))
    }
}

/// A caller allowed to change experience libraries (extracted before the
/// body, so a refused write is refused whatever it sends).
#[derive(Debug, Clone)]
pub struct LibraryWriter(pub Caller);

impl<S: Send + Sync> FromRequestParts<S> for LibraryWriter {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let Ok(caller) = Caller::from_request_parts(parts, state).await;
        caller.require(Scope::ExperiencesWrite, "changing an experience library")?;
        Ok(LibraryWriter(caller))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring() -> KeyRing {
        let file = parse_key_file("# keys\nplain\n\nwriter scopes=experiences:write\nboss  scopes=admin\n").unwrap();
        KeyRing::new(file, Some("the-admin".into()))
    }

    #[test]
    fn key_files_carry_scopes_and_errors_name_the_line_not_the_key() {
        let k = parse_key_file("a\nb scopes=experiences:write,admin\nc scopes=admin,admin\n").unwrap();
        assert_eq!(
            k,
            vec![("a".into(), vec![]), ("b".into(), vec![Scope::ExperiencesWrite, Scope::Admin]), ("c".into(), vec![Scope::Admin])]
        );
        let e = parse_key_file("ok\nsecret-key scopes=everything\n").unwrap_err();
        assert!(e.contains("line 2") && e.contains("everything") && !e.contains("secret-key"), "{e}");
        let e = parse_key_file("secret-key admin\n").unwrap_err();
        assert!(e.contains("line 1") && !e.contains("secret-key"), "{e}");
    }

    #[test]
    fn plain_keys_read_scoped_keys_and_the_admin_write() {
        let r = ring();
        let w = Scope::ExperiencesWrite;
        assert!(r.caller(Some("plain")).is_authenticated());
        let refused = r.caller(Some("plain")).require(w, "x").unwrap_err();
        assert!(matches!(&refused, ApiError::MissingScope { scope: "experiences:write", .. }), "{refused:?}");
        assert!(r.caller(Some("writer")).require(w, "x").is_ok());
        assert!(r.caller(Some("boss")).require(w, "x").is_ok(), "scope admin implies every scope");
        assert!(r.caller(Some("the-admin")).require(w, "x").is_ok());
        assert!(matches!(r.caller(None).require(w, "x"), Err(ApiError::Unauthorized(_))));
        assert!(matches!(r.caller(Some("nope")).require(w, "x"), Err(ApiError::Unauthorized(_))));
        // The admin API: the admin key and scope `admin` only.
        assert!(r.caller(Some("the-admin")).require_admin().is_ok());
        assert!(r.caller(Some("boss")).require_admin().is_ok());
        assert!(matches!(r.caller(Some("writer")).require_admin(), Err(ApiError::MissingScope { scope: "admin", .. })));
        assert!(matches!(r.caller(None).require_admin(), Err(ApiError::Unauthorized(_))));
        assert!(matches!(KeyRing::new(vec![("k".into(), vec![])], None).caller(Some("k")).require_admin(), Err(ApiError::Forbidden(_))));
    }

    #[test]
    fn without_keys_everything_but_admin_is_open() {
        let r = KeyRing::default();
        assert!(r.is_open());
        let c = r.caller(None);
        assert!(c.require(Scope::ExperiencesWrite, "x").is_ok());
        assert!(matches!(c.require_admin(), Err(ApiError::Forbidden(_))));
        assert_eq!(c.actor(), "anonymous");
        // An admin key alone closes the writes (reads stay open).
        let r = KeyRing::new(vec![], Some("a".into()));
        assert!(!r.is_open() && !r.has_api_keys());
        assert!(r.caller(None).require(Scope::ExperiencesWrite, "x").is_err());
        assert!(r.caller(Some("a")).require(Scope::ExperiencesWrite, "x").is_ok());
    }

    #[test]
    fn callers_are_named_by_a_hash_never_the_key() {
        let r = ring();
        let id = r.caller(Some("writer")).owner().unwrap();
        assert!(id.starts_with("key:") && id.len() == 20 && !id.contains("writer"), "{id}");
        assert_eq!(r.caller(Some("writer")).owner().unwrap(), id, "stable");
        assert_ne!(r.caller(Some("plain")).owner().unwrap(), id);
        assert_eq!(r.caller(Some("the-admin")).owner().as_deref(), Some("admin"));
        assert_eq!(r.caller(Some("nope")).owner(), None);
        assert!(!format!("{r:?}").contains("writer") && !format!("{r:?}").contains("plain"), "{r:?}");
    }

    #[test]
    fn only_non_loopback_addresses_without_api_keys_warn() {
        let open = KeyRing::default();
        assert!(open.exposure_warning("127.0.0.1".parse().unwrap()).is_none());
        assert!(open.exposure_warning("::1".parse().unwrap()).is_none());
        let w = open.exposure_warning("0.0.0.0".parse().unwrap()).unwrap();
        assert!(w.contains("0.0.0.0") && w.contains("experience"), "{w}");
        assert!(KeyRing::new(vec![], Some("a".into())).exposure_warning("10.0.0.5".parse().unwrap()).is_some());
        assert!(ring().exposure_warning("0.0.0.0".parse().unwrap()).is_none());
    }

    #[test]
    fn constant_time_eq_compares_whole_strings() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
        assert!(!constant_time_eq(b"", b"x"));
    }
}
