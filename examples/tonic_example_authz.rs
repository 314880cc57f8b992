//! An ext_authz server written the way the tonic examples (and most tonic
//! users) write one: `#[tokio::main]`, the generated service, a response
//! built on every call, `Server::builder().serve(addr)`. The benchmark suite
//! measures it beside `empty_authz` to show that baseline is no straw man.
//!
//!     tonic_example_authz --addr 127.0.0.1:50062

use envoy_types::ext_authz::v3::{
    CheckResponseExt as _,
    pb::{Authorization, AuthorizationServer, CheckRequest, CheckResponse},
};
use tonic::{Request, Response, Status, transport::Server};

#[derive(Default)]
struct AllowAll;

#[tonic::async_trait]
impl Authorization for AllowAll {
    async fn check(
        &self,
        _request: Request<CheckRequest>,
    ) -> Result<Response<CheckResponse>, Status> {
        Ok(Response::new(CheckResponse::with_status(Status::ok(""))))
    }
}

#[derive(clap::Parser)]
struct Args {
    #[arg(long)]
    addr: std::net::SocketAddr,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = <Args as clap::Parser>::parse();
    Server::builder()
        .add_service(AuthorizationServer::new(AllowAll))
        .serve(args.addr)
        .await?;
    Ok(())
}
