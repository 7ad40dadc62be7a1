//! Who may do what: JWTs (HS256) minted by the application's backend, in the spirit of
//! Mercure's, and the check at start that the daemon is not exposed without them.
//!
//! ```json
//! {"progressd": {"publish": ["build-*"], "subscribe": ["build-42"], "admin": false}, "exp": 1764158400}
//! ```
//!
//! Each entry is an exact job id, a prefix pattern (`build-*`) or `*`. The token comes from
//! `Authorization: Bearer …`, else the `access_token` query parameter (EventSource cannot set
//! headers), else the `progressd_token` cookie. Tokens are never logged.
//!
//! Without `--jwt-secret-file` every request is allowed; that is only accepted when the daemon
//! listens on loopback or Unix sockets, or with `--allow-anonymous`.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use thiserror::Error;

use crate::listen::ListenAddr;

/// The verifier, or none when auth is off.
#[derive(Clone)]
pub struct Auth {
    key: Option<Arc<DecodingKey>>,
}

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum AuthError {
    #[error(
        "a token is required: Authorization: Bearer, ?access_token= or the progressd_token cookie"
    )]
    Missing,
    #[error("the token is not valid: {0}")]
    Invalid(String),
}

#[derive(Debug, Error)]
pub enum ExposureError {
    #[error(
        "listening on {0} (not loopback) without --jwt-secret-file would let anyone read and \
         write every job; set --jwt-secret-file, or pass --allow-anonymous if this is intended"
    )]
    Exposed(String),
}

/// The claims we read.
#[derive(Debug, Default, Deserialize)]
struct Claims {
    #[serde(default)]
    progressd: Permissions,
    exp: u64,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct Permissions {
    #[serde(default)]
    publish: Vec<String>,
    #[serde(default)]
    subscribe: Vec<String>,
    #[serde(default)]
    admin: bool,
}

/// What a request may do.
#[derive(Clone, Debug, Default)]
pub enum Grant {
    /// Auth is off: everything.
    #[default]
    Anyone,
    Token {
        perms: Arc<Permissions>,
        expires: SystemTime,
    },
}

impl Auth {
    pub fn new(secret: Option<&[u8]>) -> Auth {
        Auth {
            key: secret.map(|s| Arc::new(DecodingKey::from_secret(s))),
        }
    }

    pub fn enabled(&self) -> bool {
        self.key.is_some()
    }

    /// The grant of a request that carried `token` (if any).
    pub fn grant(&self, token: Option<&str>) -> Result<Grant, AuthError> {
        let Some(key) = &self.key else {
            return Ok(Grant::Anyone);
        };
        let token = token.ok_or(AuthError::Missing)?;
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = 0;
        validation.set_required_spec_claims(&["exp"]);
        let data = jsonwebtoken::decode::<Claims>(token, key, &validation)
            .map_err(|e| AuthError::Invalid(e.to_string()))?;
        Ok(Grant::Token {
            perms: Arc::new(data.claims.progressd),
            expires: UNIX_EPOCH + Duration::from_secs(data.claims.exp),
        })
    }
}

/// `*`, `prefix*` or an exact id.
fn matches(pattern: &str, job: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => job.starts_with(prefix),
        None => pattern == job,
    }
}

/// Whether some job starting with `prefix` could match `pattern`.
fn overlaps(pattern: &str, prefix: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(p) => p.starts_with(prefix) || prefix.starts_with(p),
        None => pattern.starts_with(prefix),
    }
}

impl Grant {
    pub fn can_publish(&self, job: &str) -> bool {
        match self {
            Grant::Anyone => true,
            Grant::Token { perms, .. } => {
                perms.admin || perms.publish.iter().any(|p| matches(p, job))
            }
        }
    }

    pub fn can_subscribe(&self, job: &str) -> bool {
        match self {
            Grant::Anyone => true,
            Grant::Token { perms, .. } => {
                perms.admin || perms.subscribe.iter().any(|p| matches(p, job))
            }
        }
    }

    /// Whether any job under `prefix` may be read (a filter wholly outside is refused).
    pub fn can_subscribe_under(&self, prefix: &str) -> bool {
        match self {
            Grant::Anyone => true,
            Grant::Token { perms, .. } => {
                perms.admin || perms.subscribe.iter().any(|p| overlaps(p, prefix))
            }
        }
    }

    pub fn is_admin(&self) -> bool {
        match self {
            Grant::Anyone => true,
            Grant::Token { perms, .. } => perms.admin,
        }
    }

    /// When a stream opened with this grant must end.
    pub fn expires(&self) -> Option<SystemTime> {
        match self {
            Grant::Anyone => None,
            Grant::Token { expires, .. } => Some(*expires),
        }
    }

    /// How long from now until it expires (zero if it has).
    pub fn remaining(&self) -> Option<Duration> {
        self.expires().map(|t| {
            t.duration_since(SystemTime::now())
                .unwrap_or(Duration::ZERO)
        })
    }
}

/// Refuses to serve anonymously on anything but loopback and Unix sockets.
pub fn check_exposure(
    addrs: &[ListenAddr],
    auth: &Auth,
    allow_anonymous: bool,
) -> Result<(), ExposureError> {
    if auth.enabled() || allow_anonymous {
        return Ok(());
    }
    for addr in addrs {
        if let ListenAddr::Tcp(sa) = addr {
            if !sa.ip().is_loopback() {
                return Err(ExposureError::Exposed(addr.to_string()));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(perms: Permissions) -> Grant {
        Grant::Token {
            perms: Arc::new(perms),
            expires: SystemTime::now(),
        }
    }

    #[test]
    fn patterns() {
        let g = token(Permissions {
            publish: vec!["build-*".into()],
            subscribe: vec!["build-42".into(), "team:a:*".into()],
            admin: false,
        });
        assert!(g.can_publish("build-1") && !g.can_publish("deploy-1"));
        assert!(g.can_subscribe("build-42") && !g.can_subscribe("build-43"));
        assert!(g.can_subscribe("team:a:x"));
        assert!(g.can_subscribe_under("build-4") && g.can_subscribe_under("team:"));
        assert!(!g.can_subscribe_under("deploy") && !g.can_subscribe_under("build-5"));
        assert!(!g.is_admin());
        let star = token(Permissions {
            subscribe: vec!["*".into()],
            ..Permissions::default()
        });
        assert!(star.can_subscribe("anything") && star.can_subscribe_under(""));
        assert!(!star.can_publish("anything"));
    }

    #[test]
    fn exposure() {
        let off = Auth::new(None);
        let lo: ListenAddr = "127.0.0.1:1".parse().unwrap();
        let any: ListenAddr = "0.0.0.0:1".parse().unwrap();
        let unix: ListenAddr = "unix:/tmp/s".parse().unwrap();
        assert!(check_exposure(&[lo.clone(), unix], &off, false).is_ok());
        assert!(check_exposure(&[lo.clone(), any.clone()], &off, false).is_err());
        assert!(check_exposure(std::slice::from_ref(&any), &off, true).is_ok());
        assert!(check_exposure(&[any], &Auth::new(Some(b"s")), false).is_ok());
    }
}
