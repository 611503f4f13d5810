"""The storage path (`cluster.storage_path`: a folder, s3://, gs://): roots and filesystems, the
`Storage` every file there goes through, local copies of what a job names. Imports errors, redact."""
