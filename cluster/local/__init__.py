"""Local development services: the SeaweedFS S3 server."""
