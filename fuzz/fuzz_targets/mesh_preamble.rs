//! Feeds arbitrary bytes to the mesh preamble check: it never panics, and accepts nothing that
//! was not signed with the key.
#![no_main]

use iotunnel::relay::mesh::{self, MeshIdentity};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let cfg = MeshIdentity {
        node_id: "b".into(),
        key: [7; 32],
    };
    let now = 1_800_000_000_000;
    if let Ok(p) = mesh::verify_preamble(data, &cfg, now) {
        // A forged MAC is a 2^-256 event: what verifies is what the key signed.
        assert!(data.starts_with(mesh::VERSION.as_bytes()) && !p.from_node.is_empty());
    }
});
