//! The llmd daemon: configuration, environment, logging, systemd integration, the control
//! plane (Unix socket and D-Bus) and the model manager, wired into one life cycle
//! ([`daemon::run`]). The `llmd` binary (`main.rs`) parses flags and maps errors to exit codes.
//!
//! Map: [`env`] reads the environment (the only module that does), [`config`] is the one
//! config loader, [`control`] dispatches requests from [`socket`] and [`dbus`] to the
//! [`models`] actor, [`notify`] talks to systemd, [`http`] builds the HTTP app (llmd-openai),
//! [`engine`] loads models with llmd-engine, [`store`] pulls them with llmd-store after
//! [`preflight`] has checked their metadata; GPU telemetry and host checks come from
//! llmd-telemetry.

pub mod auth;
pub mod config;
pub mod control;
pub mod daemon;
pub mod dbus;
pub mod engine;
pub mod env;
pub mod http;
pub mod logging;
pub mod models;
pub mod notify;
pub mod preflight;
pub mod secret;
pub mod socket;
pub mod store;

/// Exit code for a configuration error (sysexits.h EX_CONFIG).
pub const EX_CONFIG: i32 = 78;
