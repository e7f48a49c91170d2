//! Fuzzes validation of wire specs, as a client's CreateJob would send them: any bytes that
//! decode must be validated without panicking.

#![no_main]

use berth_model::spec::{Limits, validate};
use berth_proto as pb;
use libfuzzer_sys::fuzz_target;
use prost::Message;

fuzz_target!(|data: &[u8]| {
    if let Ok(spec) = pb::JobSpec::decode(data) {
        let _ = validate(&spec, &Limits::default());
    }
});
