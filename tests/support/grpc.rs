//! gRPC helpers shared by the tests and the benchmarks (`#[path]`-included).

use tonic::Request;

/// A request carrying `authorization: Bearer <key>`.
pub fn with_key<T>(message: T, key: &str) -> Request<T> {
    let mut req = Request::new(message);
    req.metadata_mut().insert(
        "authorization",
        format!("Bearer {key}").parse().expect("ascii header"),
    );
    req
}
