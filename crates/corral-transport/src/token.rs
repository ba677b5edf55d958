//! Join tokens: `K10<sha256 of the cluster CA>::<id>.<secret>`, as k3s writes them, over
//! Kubernetes bootstrap tokens (`<id>.<secret>`, 6 and 16 characters of `[a-z0-9]`).
//!
//! The CA hash lets a new agent trust the servers before it has the CA; the id names the
//! `kube-system/bootstrap-token-<id>` Secret that holds the secret, as kubeadm keeps it.

use std::fmt;

use rand::Rng;

const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
const PREFIX: &str = "K10";

#[derive(Clone, PartialEq, Eq)]
pub struct JoinToken {
    /// SHA-256 of the cluster CA certificate (DER), 64 hex digits.
    pub ca_hash: String,
    pub id: String,
    pub secret: String,
}

#[derive(Debug, thiserror::Error, PartialEq)]
#[error(
    "invalid join token: {0}; it looks like K10<64 hex digits>::<6 chars>.<16 chars> (`corral token create` makes one)"
)]
pub struct TokenError(String);

impl JoinToken {
    /// A fresh token for the cluster whose CA hash is `ca_hash`.
    pub fn generate(ca_hash: &str) -> Self {
        let mut rng = rand::rng();
        let mut pick = |n: usize| (0..n).map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char).collect();
        JoinToken { ca_hash: ca_hash.to_string(), id: pick(6), secret: pick(16) }
    }

    pub fn parse(text: &str) -> Result<Self, TokenError> {
        let text = text.trim();
        let rest = text.strip_prefix(PREFIX).ok_or_else(|| TokenError(format!("it does not start with {PREFIX}")))?;
        let (hash, bootstrap) =
            rest.split_once("::").ok_or_else(|| TokenError("no `::` between the CA hash and the token".into()))?;
        if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(TokenError("the CA hash is not 64 hex digits".into()));
        }
        let (id, secret) =
            bootstrap.split_once('.').ok_or_else(|| TokenError("no `.` between the token id and secret".into()))?;
        let valid = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| ALPHABET.contains(&b));
        if !valid(id, 6) || !valid(secret, 16) {
            return Err(TokenError("the token id or secret has the wrong length or characters".into()));
        }
        Ok(JoinToken { ca_hash: hash.to_lowercase(), id: id.into(), secret: secret.into() })
    }

    /// The name of the Secret that holds this token.
    pub fn secret_name(&self) -> String {
        format!("bootstrap-token-{}", self.id)
    }
}

impl fmt::Display for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{PREFIX}{}::{}.{}", self.ca_hash, self.id, self.secret)
    }
}

/// The secret stays out of logs.
impl fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "JoinToken({}::{}.<hidden>)", &self.ca_hash[..8.min(self.ca_hash.len())], self.id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_bad_ones_say_what_is_wrong() {
        let hash = "ab".repeat(32);
        let token = JoinToken::generate(&hash);
        assert_eq!(JoinToken::parse(&token.to_string()).unwrap(), token);
        assert_eq!(token.secret_name(), format!("bootstrap-token-{}", token.id));
        assert!(!format!("{token:?}").contains(&token.secret));

        let err = |t: &str| JoinToken::parse(t).unwrap_err().to_string();
        assert!(err("abc").contains("does not start with K10"));
        assert!(err(&format!("K10{hash}abcdef.0123456789abcdef")).contains("no `::`"));
        assert!(err("K10abc::abcdef.0123456789abcdef").contains("64 hex digits"));
        assert!(err(&format!("K10{hash}::abcdef0123456789abcdef")).contains("no `.`"));
        assert!(err(&format!("K10{hash}::ABCDEF.0123456789abcdef")).contains("wrong length"));
        assert!(err("x").contains("corral token create"));
    }
}
