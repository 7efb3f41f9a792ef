//! The demo's network between regions: one TCP relay per ordered pair of
//! regions, through which a region's proxy reaches its peer (forwarded
//! requests, health probes, purges). A blocked link closes its open
//! connections and refuses new ones, as a partition would; the simulated
//! table's replication is separate and unaffected.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener as StdTcpListener};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// One link `from -> to`: where `from` connects, and where it leads.
pub(super) struct Link {
    pub(super) from: String,
    pub(super) to: String,
    listener: StdTcpListener,
    target: SocketAddr,
}

impl Link {
    /// Bind a relay on a free loopback port, leading to `target`.
    pub(super) fn bind(from: &str, to: &str, target: SocketAddr) -> std::io::Result<Link> {
        let listener = StdTcpListener::bind(("127.0.0.1", 0))?;
        listener.set_nonblocking(true)?;
        Ok(Link {
            from: from.to_string(),
            to: to.to_string(),
            listener,
            target,
        })
    }

    /// The port `from` is configured to reach `to` at.
    pub(super) fn port(&self) -> std::io::Result<u16> {
        Ok(self.listener.local_addr()?.port())
    }
}

/// Switches of every link, by `(from, to)`; `true` = blocked.
#[derive(Default)]
pub(super) struct Links {
    switches: HashMap<(String, String), watch::Sender<bool>>,
}

impl Links {
    /// Serve every link on the current runtime.
    pub(super) fn start(links: Vec<Link>) -> std::io::Result<Links> {
        let mut switches = HashMap::new();
        for link in links {
            let (tx, rx) = watch::channel(false);
            let listener = TcpListener::from_std(link.listener)?;
            tokio::spawn(relay(listener, link.target, rx));
            switches.insert((link.from, link.to), tx);
        }
        Ok(Links { switches })
    }

    /// Block or open `from -> to`; false when there is no such link.
    pub(super) fn set_blocked(&self, from: &str, to: &str, blocked: bool) -> bool {
        match self.switches.get(&(from.to_string(), to.to_string())) {
            Some(tx) => {
                tx.send_replace(blocked);
                true
            }
            None => false,
        }
    }
}

async fn relay(listener: TcpListener, target: SocketAddr, blocked: watch::Receiver<bool>) {
    loop {
        let Ok((mut inbound, _)) = listener.accept().await else {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            continue;
        };
        if *blocked.borrow() {
            drop(inbound);
            continue;
        }
        let mut blocked = blocked.clone();
        tokio::spawn(async move {
            let Ok(mut outbound) = TcpStream::connect(target).await else {
                return;
            };
            let _ = inbound.set_nodelay(true);
            let _ = outbound.set_nodelay(true);
            tokio::select! {
                _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                // Blocking cuts the connections already open too.
                _ = blocked.wait_for(|b| *b) => {}
            }
        });
    }
}
