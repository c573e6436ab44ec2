//! The bottom layer of dagr-inject: ONNX model I/O, the graph index, shape facts and node
//! builders, and what every layer above shares: the typed errors (`error`), the size bounds
//! checked before allocating (`limits`), the fault-injection test hook (`fault`), the seeded
//! generator (`rng`) and the state links of graphs run step after step (`state`).
//!
//! Everything above this layer (autodiff, dagr, runtime, train, report, the command line) reads
//! and writes graphs through the types here; nothing here knows about DAGR.

#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod attr;
pub mod builder;
pub mod dim;
pub mod error;
pub mod fault;
pub mod functions;
pub mod index;
pub mod io;
pub mod limits;
pub mod ops;
pub mod rng;
pub mod state;
pub mod tensor;

pub use error::{Error, Result};

pub use index::{Dim, GraphIndex, ValueFact};
pub use io::{load, save, Model};
pub use onnx_protobuf as proto;

/// ONNX element types used by this crate (values of `TensorProto.DataType`).
pub mod dtype {
    pub const FLOAT: i32 = 1;
    pub const UINT8: i32 = 2;
    pub const INT8: i32 = 3;
    pub const INT32: i32 = 6;
    pub const INT64: i32 = 7;
    pub const BOOL: i32 = 9;
    pub const FLOAT16: i32 = 10;
    pub const DOUBLE: i32 = 11;
    pub const BFLOAT16: i32 = 16;

    pub fn is_float(t: i32) -> bool {
        matches!(t, FLOAT | FLOAT16 | DOUBLE | BFLOAT16)
    }

    /// Bytes per element of the fixed-size types (`None` for strings and unknown types).
    pub fn size_of(t: i32) -> Option<usize> {
        match t {
            UINT8 | INT8 | BOOL => Some(1),
            4 | 5 | FLOAT16 | BFLOAT16 => Some(2),
            FLOAT | INT32 | 12 => Some(4),
            INT64 | DOUBLE | 13 => Some(8),
            _ => None,
        }
    }

    pub fn name(t: i32) -> &'static str {
        match t {
            0 => "undefined",
            FLOAT => "float32",
            UINT8 => "uint8",
            INT8 => "int8",
            4 => "uint16",
            5 => "int16",
            INT32 => "int32",
            INT64 => "int64",
            8 => "string",
            BOOL => "bool",
            FLOAT16 => "float16",
            DOUBLE => "float64",
            12 => "uint32",
            13 => "uint64",
            BFLOAT16 => "bfloat16",
            _ => "other",
        }
    }
}
