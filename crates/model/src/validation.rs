//! Validation errors and the small checks shared by codes, tasks and schedules.

/// Input that does not make a valid domain value. The message is written for the person who
/// sent the request: it names the field and says what would be accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct ValidationError {
    pub field: String,
    pub message: String,
}

impl ValidationError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }

    /// The same error, reported under a prefix such as `tasks[3]`.
    pub fn within(self, prefix: &str) -> Self {
        Self {
            field: format!("{prefix}.{}", self.field),
            message: self.message,
        }
    }
}

/// A name a person chose: a code, a label, a cluster. Non-empty, bounded, printable.
pub fn check_name(field: &str, value: &str) -> Result<(), ValidationError> {
    if value.trim().is_empty() {
        return Err(ValidationError::new(field, "must not be empty"));
    }
    if value.len() > crate::limits::MAX_NAME_LEN {
        return Err(ValidationError::new(
            field,
            format!("must be at most {} bytes", crate::limits::MAX_NAME_LEN),
        ));
    }
    if value.chars().any(|c| c.is_control() || c == '/') {
        return Err(ValidationError::new(
            field,
            "must not contain control characters or '/'",
        ));
    }
    Ok(())
}

/// An integer in `min..=max`, with a message that names the range.
pub fn check_range(field: &str, value: i64, min: i64, max: i64) -> Result<(), ValidationError> {
    if value < min || value > max {
        return Err(ValidationError::new(
            field,
            format!("must be between {min} and {max}, got {value}"),
        ));
    }
    Ok(())
}
