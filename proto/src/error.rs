//! What can be wrong with a message received from the other side.

/// A wire message that does not describe a valid request or answer.
///
/// On the server this becomes `InvalidArgument`; on a client it means the
/// server sent something it should not have, and the answer is discarded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// A required field is absent.
    #[error("field `{0}` is missing")]
    Missing(&'static str),
    /// A field is present but its value is not acceptable.
    #[error("field `{field}` is invalid: {reason}")]
    Invalid {
        /// The field, as named in the .proto.
        field: &'static str,
        /// What is wrong, and what would be right.
        reason: String,
    },
}

impl ProtocolError {
    /// Shorthand for [`ProtocolError::Invalid`].
    pub fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        Self::Invalid {
            field,
            reason: reason.into(),
        }
    }
}

impl From<ProtocolError> for tonic::Status {
    fn from(err: ProtocolError) -> Self {
        tonic::Status::invalid_argument(err.to_string())
    }
}
