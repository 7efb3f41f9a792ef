//! systemd's readiness protocol (`Type=notify`): one datagram to the socket
//! named in `NOTIFY_SOCKET`. `MAINPID` tells systemd which process is the
//! service after a graceful upgrade, since the successor is not the one it
//! started (the unit needs `NotifyAccess=all`). Without `NOTIFY_SOCKET`
//! (not under systemd) nothing is sent.

use std::os::unix::net::UnixDatagram;

/// Tell systemd this process is serving and is now the service's main process.
pub fn ready() {
    let state = format!("READY=1\nMAINPID={}\n", std::process::id());
    if let Err(e) = notify(&state) {
        tracing::warn!(error = %e, "cannot tell systemd that edge-router is ready (NOTIFY_SOCKET)");
    }
}

fn notify(state: &str) -> std::io::Result<()> {
    match std::env::var_os("NOTIFY_SOCKET") {
        Some(path) => notify_to(&path, state),
        None => Ok(()),
    }
}

fn notify_to(path: &std::ffi::OsStr, state: &str) -> std::io::Result<()> {
    let socket = UnixDatagram::unbound()?;
    let bytes = path.as_encoded_bytes();
    match bytes.strip_prefix(b"@") {
        // An abstract socket (Linux).
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            socket.send_to_addr(state.as_bytes(), &addr)?;
        }
        None => {
            socket.send_to(state.as_bytes(), path)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::notify_to;

    #[test]
    fn the_state_reaches_the_socket_named_in_notify_socket() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("notify");
        let listener = std::os::unix::net::UnixDatagram::bind(&path).expect("bind");
        notify_to(path.as_os_str(), "READY=1\n").expect("sent");
        let mut buf = [0u8; 64];
        let n = listener.recv(&mut buf).expect("received");
        assert_eq!(&buf[..n], b"READY=1\n");
    }
}
