//! GPU telemetry and host checks (filled in by the telemetry work).
