//! PENDING: Dockerfile builds.
pub async fn build_code_image(
    _name: &str,
    _context: &std::path::Path,
    _progress: bool,
) -> anyhow::Result<String> {
    anyhow::bail!("pending")
}
