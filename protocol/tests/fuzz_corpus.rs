//! Replays the fuzz corpora (`protocol/fuzz/corpus/`) through the decoders, so the inputs
//! found by fuzzing keep being checked where cargo-fuzz cannot run (stable toolchain, CI).

use std::path::Path;

use spillway_protocol::frame::{Decoded, Decoder, encode};
use spillway_protocol::{Limits, decode_samples};

fn corpus(name: &str) -> Vec<(String, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(name);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{dir:?}: {e}"))
        .map(|entry| {
            let path = entry.expect("entry").path();
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            (name, std::fs::read(&path).expect("read"))
        })
        .collect();
    files.sort();
    assert!(!files.is_empty(), "empty corpus {dir:?}");
    files
}

#[test]
fn frame_corpus_decodes_without_panicking_and_valid_frames_round_trip() {
    let mut frames = 0;
    for (name, bytes) in corpus("frame") {
        // Walk the buffer frame by frame, as a connection would.
        let decoder = Decoder::new(64 * 1024);
        let mut at = 0;
        while let Ok(Decoded::Frame { message, consumed }) = decoder.decode(&bytes[at..]) {
            let again = encode(&message);
            assert_eq!(
                decoder.decode(&again),
                Ok(Decoded::Frame {
                    message,
                    consumed: again.len()
                }),
                "{name}"
            );
            at += consumed;
            frames += 1;
        }
    }
    assert!(frames >= 4, "the seed corpus holds valid frames: {frames}");
}

#[test]
fn payload_corpus_gives_samples_or_a_typed_refusal() {
    let limits = Limits {
        max_payload_bytes: 64 * 1024,
        max_samples: 1024,
    };
    let mut accepted = 0;
    for (name, bytes) in corpus("payload") {
        match decode_samples(&bytes, &limits) {
            Ok(samples) => {
                assert!(samples.values.iter().all(|v| v.is_finite()), "{name}");
                accepted += 1;
            }
            Err(e) => assert!(!e.kind().is_empty(), "{name}"),
        }
    }
    assert!(accepted >= 3, "the seed corpus holds valid payloads");
}
