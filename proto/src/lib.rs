//! The llmd control-plane protocol, shared by the daemon (`llmd`) and its client (`llmctl`).
//!
//! This crate holds only the protocol: the message types ([`messages`]), the wire framing
//! ([`framing`]), an async client over the Unix socket ([`client`]) and, behind the `dbus`
//! feature, the zbus proxy for the same operations on D-Bus ([`dbus`]). It never links the
//! engine or CUDA.
//!
//! # Framing
//! Every message is one frame: a 4-byte big-endian length `N` followed by `N` bytes of UTF-8
//! JSON. `N` is at most [`MAX_FRAME_BYTES`]; a peer that announces more is answered with a
//! `frame_too_large` error and disconnected without the payload ever being allocated.
//!
//! # Conversation
//! 1. The client sends `{"id":0,"request":{"method":"hello","protocol":1,"client":"llmctl 0.1.0"}}`.
//! 2. The daemon answers `{"event":"reply","id":0,"reply":{"kind":"hello",...}}`, or a
//!    `version_mismatch` error and closes.
//! 3. Each later request carries a client-chosen `id`; the daemon may send any number of
//!    `progress` frames with that id, then exactly one `reply` or `error` frame.
//!
//! The full description is in `docs/control-protocol.md`.

pub mod client;
#[cfg(feature = "dbus")]
pub mod dbus;
pub mod framing;
pub mod messages;

pub use client::{Client, ClientError};
pub use framing::{FrameError, MAX_FRAME_BYTES};
pub use messages::*;

/// Protocol version spoken by this build. Bumped on any incompatible change.
pub const PROTOCOL_VERSION: u32 = 1;

/// Where a system-wide daemon listens when the config does not say otherwise.
pub const DEFAULT_SOCKET: &str = "/run/llmd/llmd.sock";

/// Environment variable that points llmctl at another socket.
pub const SOCKET_ENV: &str = "LLMD_SOCKET";

/// Default group whose members may use the control socket.
pub const DEFAULT_CONTROL_GROUP: &str = "llmd";
