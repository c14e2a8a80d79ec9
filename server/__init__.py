"""The blobstore server: gRPC service, storage engine, signed-URL HTTP endpoint."""
