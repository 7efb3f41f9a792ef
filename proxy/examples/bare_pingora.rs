//! A bare Pingora proxy (the two-method `ProxyHttp`, one backend, system
//! allocator): the baseline `bench/idle-connections.sh` measures edge-router
//! against. Not part of the product.
//!
//!     bare_pingora LISTEN_ADDR BACKEND_ADDR

use async_trait::async_trait;
use pingora::prelude::*;

struct Bare {
    backend: std::net::SocketAddr,
}

#[async_trait]
impl ProxyHttp for Bare {
    type CTX = ();

    fn new_ctx(&self) {}

    async fn upstream_peer(&self, _session: &mut Session, _ctx: &mut ()) -> Result<Box<HttpPeer>> {
        Ok(Box::new(HttpPeer::new(self.backend, false, String::new())))
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let (Some(listen), Some(backend)) = (args.next(), args.next()) else {
        eprintln!("usage: bare_pingora LISTEN_ADDR BACKEND_ADDR");
        std::process::exit(2);
    };
    let Ok(backend) = backend.parse() else {
        eprintln!("bare_pingora: `{backend}` is not ip:port");
        std::process::exit(2);
    };
    let mut server = Server::new(None).unwrap_or_else(|e| {
        eprintln!("bare_pingora: {e}");
        std::process::exit(1)
    });
    server.bootstrap();
    let mut proxy = pingora::proxy::http_proxy_service(&server.configuration, Bare { backend });
    proxy.add_tcp(&listen);
    proxy.threads = Some(1);
    server.add_service(proxy);
    server.run_forever();
}
