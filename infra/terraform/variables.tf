variable "namespace" {
  description = "Namespace of the streamvqa release (pipeline, Ray cluster, Kafka, topics)."
  type        = string
  default     = "streamvqa"
}

variable "release_name" {
  description = "Helm release name of the streamvqa chart; prefixes its objects and the Flink storage path."
  type        = string
  default     = "streamvqa"
}

variable "chart_values" {
  description = "Extra values for the streamvqa chart (merged over infra/helm/streamvqa/values.yaml and the wiring this module sets)."
  type        = any
  default     = {}
}

variable "install_operators" {
  description = "Install the Flink Kubernetes operator, KubeRay operator and Strimzi operator (false when the cluster already runs them)."
  type        = bool
  default     = true
}

variable "install_minio" {
  description = "Install a MinIO server (official chart) in namespace minio_namespace; false to use an existing S3 endpoint (then set s3_endpoint and create the credentials Secret yourself)."
  type        = bool
  default     = true
}

variable "s3_endpoint" {
  description = "host:port of an existing S3/MinIO endpoint; ignored when install_minio is true."
  type        = string
  default     = ""
}

variable "buckets" {
  description = "Buckets to create in MinIO: the streamvqa data bucket (KV blocks, snapshots) and the Flink checkpoint bucket."
  type = object({
    data        = string
    checkpoints = string
  })
  default = {
    data        = "streamvqa"
    checkpoints = "streamvqa-flink"
  }
}

variable "topic_partitions" {
  description = "Partitions of every streamvqa topic (see docs/capacity.md for sizing)."
  type        = number
  default     = 12
}

variable "gpu_workers" {
  description = "Ray GPU worker group bounds for the autoscaler."
  type = object({
    min = number
    max = number
  })
  default = {
    min = 1
    max = 8
  }
}

variable "minio_storage_size" {
  description = "Persistent volume size of the MinIO server."
  type        = string
  default     = "500Gi"
}

variable "operator_chart_versions" {
  description = "Pinned chart versions of the operators and MinIO."
  type = object({
    flink_operator = string
    kuberay        = string
    strimzi        = string
    minio          = string
  })
  default = {
    flink_operator = "1.11.0"
    kuberay        = "1.4.2"
    strimzi        = "0.47.0"
    minio          = "5.4.0"
  }
}
