//! The handler's Unix socket: one handler per path. A handler restarted by its supervisor comes
//! back on the same path: the socket file a killed handler left is stale (nobody accepts on it)
//! and is replaced; a socket a live handler is using is refused with a message saying so.
//!
//! The logic (an `flock` on `PATH.lock` says who is alive, mode 0600) is shared with
//! `faultline-server serve --listen unix://...`: [`faultline_proto::unix`].

pub use faultline_proto::unix::{BindError, UnixSocket as HandlerSocket, bind, lock_path};
