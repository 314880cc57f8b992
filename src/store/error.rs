//! The one place where sqlx errors are translated into store errors, by kind
//! and SQLSTATE.

/// What went wrong in the store, in terms the layers above can act on.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("not found")]
    NotFound,
    #[error("conflicts with an existing row")]
    Conflict(#[source] sqlx::Error),
    /// The database cannot be reached or refuses work for now; retrying later
    /// may succeed. Checks turn this into `UNAVAILABLE`.
    #[error("database unavailable")]
    Unavailable(#[source] sqlx::Error),
    /// The database did not answer within the call's deadline (hung,
    /// partitioned, or overloaded). Retrying later may succeed.
    #[error("database did not answer within {0:?}")]
    Timeout(std::time::Duration),
    #[error("database error")]
    Internal(#[source] sqlx::Error),
    #[error("stored row is invalid: {0}")]
    Corrupt(String),
    /// The change breaks a rule checked on the locked row (least privilege,
    /// the last admin key, a quota).
    #[error(transparent)]
    Refused(#[from] Refusal),
    #[error("migration failed")]
    Migrate(#[source] sqlx::migrate::MigrateError),
    /// Start-up without migrating found a schema this build does not match.
    #[error(
        "the database schema is behind this keyward: {missing} migration(s) not applied \
         (run `keyward migrate`, or the chart's migration job, first)"
    )]
    Schema { missing: usize },
}

/// Why a change was refused on the row as it stands.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The caller may not do this (to this row).
    #[error("{0}")]
    PermissionDenied(String),
    /// The row is not in a state that allows it.
    #[error("{0}")]
    FailedPrecondition(String),
    /// The owner's quota is used up.
    #[error("{0}")]
    QuotaExceeded(String),
}

impl StoreError {
    /// Whether the database could not be reached or did not answer, so that
    /// retrying later may succeed (as opposed to a bad statement or row).
    pub fn is_retryable(&self) -> bool {
        matches!(self, StoreError::Unavailable(_) | StoreError::Timeout(_))
    }
}

impl From<sqlx::Error> for StoreError {
    fn from(err: sqlx::Error) -> Self {
        translate(err)
    }
}

impl From<sqlx::migrate::MigrateError> for StoreError {
    fn from(err: sqlx::migrate::MigrateError) -> Self {
        StoreError::Migrate(err)
    }
}

fn translate(err: sqlx::Error) -> StoreError {
    use sqlx::Error as E;
    match &err {
        E::RowNotFound => StoreError::NotFound,
        E::Io(_) | E::Tls(_) | E::PoolTimedOut | E::PoolClosed | E::WorkerCrashed => {
            StoreError::Unavailable(err)
        }
        E::Database(db) => match db.code().as_deref().unwrap_or("") {
            "23505" => StoreError::Conflict(err),
            code if is_unavailable(code) => StoreError::Unavailable(err),
            _ => StoreError::Internal(err),
        },
        _ => StoreError::Internal(err),
    }
}

/// SQLSTATEs meaning "the database cannot serve us right now" rather than
/// "this statement is wrong".
fn is_unavailable(code: &str) -> bool {
    code.starts_with("08") // connection exception
        || code.starts_with("57P") // admin/crash shutdown, cannot connect now
        || code.starts_with("53") // insufficient resources (too many connections, disk full)
        || code.starts_with("28") // invalid authorization (credentials changed)
        || matches!(
            code,
            "57014" // query canceled (statement timeout)
            | "3D000" // database does not exist (dropped under us)
            | "42501" // insufficient privilege (e.g. CONNECT revoked)
            | "40001" // serialization failure
            | "40P01" // deadlock detected
            | "25006" // read-only transaction (failover to a replica)
            | "55000" // database not accepting connections (ALLOW_CONNECTIONS false)
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_and_io_failures_are_unavailable() {
        assert!(matches!(
            StoreError::from(sqlx::Error::PoolTimedOut),
            StoreError::Unavailable(_)
        ));
        assert!(matches!(
            StoreError::from(sqlx::Error::PoolClosed),
            StoreError::Unavailable(_)
        ));
        assert!(matches!(
            StoreError::from(sqlx::Error::RowNotFound),
            StoreError::NotFound
        ));
    }

    #[test]
    fn timeouts_and_unavailability_are_retryable() {
        assert!(StoreError::Timeout(std::time::Duration::from_secs(1)).is_retryable());
        assert!(StoreError::from(sqlx::Error::PoolTimedOut).is_retryable());
        assert!(!StoreError::NotFound.is_retryable());
    }

    #[test]
    fn sqlstate_classes_map_to_unavailable() {
        for code in [
            "08006", "57P01", "53300", "28P01", "57014", "3D000", "42501",
        ] {
            assert!(is_unavailable(code), "{code}");
        }
        for code in ["23505", "22001", "42P01", ""] {
            assert!(!is_unavailable(code), "{code}");
        }
    }
}
