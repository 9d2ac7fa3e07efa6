"""S3: the client settings, staging transfers and the embedded S3 server."""
