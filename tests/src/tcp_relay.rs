//! A TCP relay whose link can go dark and be cut, for faults of the network between an agent
//! and its broker while both stay up.
//!
//! [`TcpRelay::go_dark`] stops forwarding bytes, both ways, on the connections open now:
//! what either side writes waits in the relay's socket buffers, as on a link that went dark
//! with TCP still up. [`TcpRelay::cut`] then resets those connections (RST: whatever was held
//! is gone) and lets new connections through as usual, as when the link returns;
//! [`TcpRelay::go_down`] resets them and refuses new ones until [`TcpRelay::come_up`], as when
//! the broker is out of reach for a while. It runs on a thread of its own, so a busy test
//! cannot hold up the "network".

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::watch;

use crate::NetworkThread;

/// The link as the relay's connections see it.
#[derive(Debug, Clone, Copy, Default)]
struct Link {
    /// Connections accepted before a cut have an older generation and close.
    generation: u64,
    /// Whether bytes are held instead of forwarded.
    dark: bool,
    /// Whether new connections are closed as soon as they are accepted.
    down: bool,
}

/// A TCP relay from a loopback port to one upstream address.
pub struct TcpRelay {
    addr: SocketAddr,
    link: watch::Sender<Link>,
    _thread: NetworkThread,
}

impl TcpRelay {
    /// Relays connections on a free loopback port to `upstream`.
    pub async fn start(upstream: SocketAddr) -> anyhow::Result<TcpRelay> {
        let (link, _) = watch::channel(Link::default());
        let links = link.clone();
        let (thread, addr) =
            NetworkThread::start("tcp-relay", move |ready| accept(upstream, links, ready)).await?;
        Ok(TcpRelay {
            addr,
            link,
            _thread: thread,
        })
    }

    /// The port clients connect to.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Holds every byte, both ways, on the connections open now.
    pub fn go_dark(&self) {
        self.link.send_modify(|l| l.dark = true);
    }

    /// Resets the connections open now; new ones are relayed as usual.
    pub fn cut(&self) {
        self.link.send_modify(|l| {
            l.generation += 1;
            l.dark = false;
        });
    }

    /// Resets the connections open now and refuses new ones.
    pub fn go_down(&self) {
        self.link.send_modify(|l| {
            l.generation += 1;
            l.dark = false;
            l.down = true;
        });
    }

    /// Relays new connections again.
    pub fn come_up(&self) {
        self.link.send_modify(|l| l.down = false);
    }
}

async fn accept(
    upstream: SocketAddr,
    link: watch::Sender<Link>,
    ready: tokio::sync::oneshot::Sender<anyhow::Result<SocketAddr>>,
) {
    let listener = match tokio::net::TcpListener::bind("127.0.0.1:0").await {
        Ok(l) => l,
        Err(e) => {
            let _ = ready.send(Err(e.into()));
            return;
        }
    };
    match listener.local_addr() {
        Ok(addr) => {
            let _ = ready.send(Ok(addr));
        }
        Err(e) => {
            let _ = ready.send(Err(e.into()));
            return;
        }
    }
    while let Ok((client, _)) = listener.accept().await {
        if link.borrow().down {
            let _ = client.set_zero_linger();
            continue;
        }
        let Ok(server) = TcpStream::connect(upstream).await else {
            continue;
        };
        let generation = link.borrow().generation;
        let (a, b) = (link.subscribe(), link.subscribe());
        tokio::spawn(async move {
            // A reset, not a close: the peer learns at once that what it sent is gone.
            let _ = client.set_zero_linger();
            let _ = server.set_zero_linger();
            let (client_rx, client_tx) = client.into_split();
            let (server_rx, server_tx) = server.into_split();
            // Either direction ending (a peer closed, or a cut) ends both.
            tokio::select! {
                _ = pump(client_rx, server_tx, a, generation) => {}
                _ = pump(server_rx, client_tx, b, generation) => {}
            }
        });
    }
}

/// Copies `from` to `to` while the link is up and of `generation`.
async fn pump(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    mut link: watch::Receiver<Link>,
    generation: u64,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let now = *link.borrow_and_update();
        if now.generation != generation {
            return;
        }
        if now.dark {
            if link.changed().await.is_err() {
                return;
            }
            continue;
        }
        tokio::select! {
            read = from.read(&mut buf) => match read {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if to.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            },
            changed = link.changed() => {
                if changed.is_err() {
                    return;
                }
            }
        }
    }
}
