//! Control-protocol frames as the daemon reads them from its socket: the length-prefixed
//! reader (`llmd_proto::framing::read_frame` with a small cap), then every frame through
//! `llmd_proto::decode_client_frame`. A frame longer than the cap must be refused before
//! any buffer is allocated; decoding must never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use llmd_proto::framing::{FrameError, read_frame};

/// A cap far below the real 1 MiB so the fuzzer reaches it; the contract is the same.
const CAP: usize = 4096;

fuzz_target!(|data: &[u8]| {
    // The raw bytes as a whole frame body (what the daemon passes after framing).
    let _ = llmd_proto::decode_client_frame(data);

    // The same bytes as a stream of frames.
    let mut reader = data;
    futures::executor::block_on(async {
        loop {
            match read_frame(&mut reader, CAP).await {
                Ok(Some(frame)) => {
                    assert!(frame.len() <= CAP, "read_frame returned {} bytes over the cap {CAP}", frame.len());
                    if let Err((_, e)) = llmd_proto::decode_client_frame(&frame) {
                        assert!(!e.message.is_empty());
                    }
                }
                Ok(None) => break,
                Err(FrameError::TooLarge { len, max }) => {
                    assert!(len > max);
                    break;
                }
                Err(_) => break,
            }
        }
    });
});
