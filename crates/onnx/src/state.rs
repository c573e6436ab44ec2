//! State that a graph run again and again reads and writes (a step graph's parameters and
//! optimizer state): which input it is read from and which output holds its update.

/// A piece of state that a graph reads from `input` and writes, updated, to `output`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StateLink {
    /// The name the state is known by outside the graph (checkpoint keys).
    pub key: String,
    pub input: String,
    pub output: String,
    /// Where the state is updated in parts (a link per part, all reading the whole state from
    /// `input`): `output` is rows `[start, end)` of its first axis, written in place into those
    /// rows of the state's buffer, so that the update holds one part's temporaries at a time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rows: Option<(usize, usize)>,
}

/// A piece of state that a graph only reads, from `input` (another graph sharing the state
/// writes it: the parameters a gradient graph reads and an update graph writes).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StateRead {
    pub key: String,
    pub input: String,
}
