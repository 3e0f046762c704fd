//! The D-Bus face of the control plane: name, object path, interface, and a zbus proxy.
//!
//! Methods mirror the socket protocol. Structured results are returned as the same JSON
//! documents the socket sends (a [`crate::Reply`] payload), so both transports share one
//! schema; simple arguments are typed. Read-only methods (`Status`, `List`, `Ps`) are open to
//! every caller; the others are authorized by the caller's uid as asked from the bus.

use zbus::proxy;

pub const BUS_NAME: &str = "org.llmd.Daemon1";
pub const OBJECT_PATH: &str = "/org/llmd/Daemon1";
pub const INTERFACE: &str = "org.llmd.Daemon1.Manager";

#[proxy(
    interface = "org.llmd.Daemon1.Manager",
    default_service = "org.llmd.Daemon1",
    default_path = "/org/llmd/Daemon1"
)]
pub trait Manager {
    /// JSON of [`crate::StatusInfo`].
    fn status(&self) -> zbus::Result<String>;
    /// JSON array of [`crate::StoredModel`].
    fn list(&self) -> zbus::Result<String>;
    /// JSON array of [`crate::RunningModel`].
    fn ps(&self) -> zbus::Result<String>;
    /// Loads a model; `options_json` is a [`crate::LoadParams`] object without `source`
    /// (may be "{}"). Returns JSON of the loaded [`crate::RunningModel`].
    fn load(&self, source: &str, options_json: &str) -> zbus::Result<String>;
    fn unload(&self, name: &str) -> zbus::Result<()>;
    /// Pulls a model; `options_json` is a [`crate::PullParams`] object without `source`.
    /// Returns JSON of the [`crate::StoredModel`].
    fn pull(&self, source: &str, options_json: &str) -> zbus::Result<String>;

    /// "starting", "ready", "reloading" or "stopping".
    #[zbus(property)]
    fn state(&self) -> zbus::Result<String>;

    #[zbus(signal)]
    fn model_loaded(&self, name: &str) -> zbus::Result<()>;
    #[zbus(signal)]
    fn model_unloaded(&self, name: &str) -> zbus::Result<()>;
    /// JSON of [`crate::Progress`] for a running pull or load.
    #[zbus(signal)]
    fn progress(&self, operation: &str, progress_json: &str) -> zbus::Result<()>;
}
