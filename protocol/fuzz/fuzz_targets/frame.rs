//! Fuzzes the frame decoder: any bytes give a frame, a request for more, or an error.
#![no_main]

use libfuzzer_sys::fuzz_target;
use spillway_protocol::frame::{Decoded, Decoder, encode};

fuzz_target!(|data: &[u8]| {
    if let Ok(Decoded::Frame { message, consumed }) = Decoder::new(64 * 1024).decode(data) {
        assert!(consumed <= data.len());
        // What decodes re-encodes to a frame that decodes to the same message.
        let again = encode(&message);
        assert!(matches!(Decoder::new(usize::MAX).decode(&again), Ok(Decoded::Frame { .. })));
    }
});
