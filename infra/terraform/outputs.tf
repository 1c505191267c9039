output "namespace" {
  description = "Namespace of the streamvqa release."
  value       = kubernetes_namespace.streamvqa.metadata[0].name
}

output "kafka_bootstrap_servers" {
  description = "In-cluster Kafka bootstrap address (STREAMVQA_KAFKA__BOOTSTRAP_SERVERS for producers and consumers)."
  value       = "streamvqa-kafka-bootstrap.${var.namespace}.svc:9092"
}

output "s3_endpoint" {
  description = "In-cluster S3 endpoint, host:port (STREAMVQA_S3__ENDPOINT)."
  value       = local.s3_endpoint
}

output "s3_credentials_secret" {
  description = "Name of the Secret (keys accessKey, secretKey) holding the S3 credentials."
  value       = kubernetes_secret.s3.metadata[0].name
}

output "buckets" {
  description = "Data and checkpoint bucket names."
  value       = var.buckets
}

output "beam_job_endpoint" {
  description = "Beam job server address (STREAMVQA_RUNNER__JOB_ENDPOINT with runner PortableRunner)."
  value       = "${var.release_name}-beam-job-server.${var.namespace}.svc:8099"
}

output "ray_service" {
  description = "Name of the RayService; KubeRay exposes it as <name>-serve-svc (Serve) and <name>-head-svc (GCS 6379, dashboard 8265)."
  value       = "${var.release_name}-serve"
}

output "flink_deployment" {
  description = "Name of the FlinkDeployment; its REST API is the service <name>-rest:8081."
  value       = "${var.release_name}-flink"
}
