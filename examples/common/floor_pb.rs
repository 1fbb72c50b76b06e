//! The floor's whole contract, by hand: one unary RPC, `floor.v1.Floor/Get`, that returns the
//! value of one Redis key. Shared by `examples/floor.rs` and the load generator.
#![allow(dead_code)] // each example uses its own part of the contract

/// The path of the floor's one RPC.
pub const GET_PATH: &str = "/floor.v1.Floor/Get";
pub const SERVICE_NAME: &str = "floor.v1.Floor";

#[derive(Clone, PartialEq, prost::Message)]
pub struct GetRequest {
    /// Shaped like a session token, so request sizes match the broker's.
    #[prost(string, tag = "1")]
    pub key: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct GetResponse {
    #[prost(bytes = "vec", tag = "1")]
    pub value: Vec<u8>,
}
