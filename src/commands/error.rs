//! Expected failures of the CLI, each with its exit code (the table in
//! `docs/exit-codes.md` and [`super::exit`]). Commands return them inside
//! `anyhow::Error`; `main` prints the cause chain once and maps the code
//! with [`exit_code`]. A command that printed an error never returns
//! success.

use super::exit;
use crate::tunnel::TunnelError;

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The daemon the command needs is not running (exit 3).
    #[error("{0}")]
    NotRunning(String),
    /// The hub refused the agent's credentials, or its key did not match (exit 4).
    #[error("{0}")]
    Refused(String),
    /// The hub could not be reached in time (exit 5).
    #[error("{0}")]
    Unreachable(String),
    /// The hub's TLS certificate (an ingress in front of it) is not trusted (exit 6).
    #[error("{0}")]
    Tls(String),
}

impl CliError {
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::NotRunning(_) => exit::NOT_RUNNING,
            CliError::Refused(_) => exit::AUTH,
            CliError::Unreachable(_) => exit::UNREACHABLE,
            CliError::Tls(_) => exit::TLS,
        }
    }
}

/// The exit code for an error: the first [`CliError`] in its chain, a
/// fatal tunnel refusal (wrong token or key: exit 4), else 1.
pub fn exit_code(e: &anyhow::Error) -> u8 {
    for cause in e.chain() {
        if let Some(c) = cause.downcast_ref::<CliError>() {
            return c.exit_code();
        }
        if cause
            .downcast_ref::<TunnelError>()
            .is_some_and(|t| t.is_fatal())
        {
            return exit::AUTH;
        }
    }
    exit::ERROR
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context;

    #[test]
    fn codes_follow_the_chain() {
        let e = anyhow::Error::new(CliError::Unreachable("x".into()));
        assert_eq!(exit_code(&e), 5);
        let e = Err::<(), _>(CliError::NotRunning("no hub".into()))
            .context("while adding alpha")
            .unwrap_err();
        assert_eq!(exit_code(&e), 3);
        assert_eq!(exit_code(&anyhow::anyhow!("plain")), 1);
        let e = anyhow::Error::new(TunnelError::Revoked {
            reason: "revoked".into(),
        });
        assert_eq!(exit_code(&e), 4);
    }
}
