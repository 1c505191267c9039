# Root module: point the providers at an existing cluster and install streamvqa.
#   terraform init && terraform apply -var kubeconfig=~/.kube/config

variable "kubeconfig" {
  description = "Path of the kubeconfig file of the target cluster."
  type        = string
  default     = "~/.kube/config"
}

variable "kube_context" {
  description = "kubeconfig context to use (empty: the current context)."
  type        = string
  default     = ""
}

provider "kubernetes" {
  config_path    = var.kubeconfig
  config_context = var.kube_context == "" ? null : var.kube_context
}

provider "helm" {
  kubernetes = {
    config_path    = var.kubeconfig
    config_context = var.kube_context == "" ? null : var.kube_context
  }
}

module "streamvqa" {
  source           = "../.."
  topic_partitions = 12
  gpu_workers      = { min = 1, max = 4 }
}

output "kafka_bootstrap_servers" {
  description = "In-cluster Kafka bootstrap address."
  value       = module.streamvqa.kafka_bootstrap_servers
}

output "beam_job_endpoint" {
  description = "Beam job server address."
  value       = module.streamvqa.beam_job_endpoint
}
