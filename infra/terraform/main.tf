# Installs streamvqa onto an existing Kubernetes cluster: the operators it needs (Flink
# Kubernetes operator, KubeRay, Strimzi), MinIO with the buckets, the credentials as Secrets
# (random, kept in the Terraform state: protect the state) and the streamvqa chart, which
# creates the FlinkDeployment, RayService, Kafka cluster and KafkaTopics.

locals {
  chart_path      = "${path.module}/../helm/streamvqa"
  minio_namespace = "minio"
  s3_endpoint     = var.install_minio ? "minio.${local.minio_namespace}.svc:9000" : var.s3_endpoint
  s3_secret_name  = "streamvqa-s3"
  ray_secret_name = "streamvqa-ray-token"
  operator_ns     = { flink = "flink-operator", kuberay = "kuberay", strimzi = "strimzi" }
}

resource "kubernetes_namespace" "streamvqa" {
  metadata {
    name   = var.namespace
    labels = { "app.kubernetes.io/part-of" = "streamvqa" }
  }
}

resource "kubernetes_namespace" "operators" {
  for_each = var.install_operators ? local.operator_ns : {}
  metadata {
    name = each.value
  }
}

resource "kubernetes_namespace" "minio" {
  count = var.install_minio ? 1 : 0
  metadata {
    name = local.minio_namespace
  }
}

# ---------------------------------------------------------------- credentials

resource "random_password" "s3_access_key" {
  length  = 20
  special = false
}

resource "random_password" "s3_secret_key" {
  length  = 40
  special = false
}

resource "random_password" "ray_token" {
  length  = 48
  special = false
}

resource "kubernetes_secret" "s3" {
  metadata {
    name      = local.s3_secret_name
    namespace = kubernetes_namespace.streamvqa.metadata[0].name
  }
  data = {
    accessKey = random_password.s3_access_key.result
    secretKey = random_password.s3_secret_key.result
  }
}

resource "kubernetes_secret" "minio_root" {
  count = var.install_minio ? 1 : 0
  metadata {
    name      = "minio-root"
    namespace = kubernetes_namespace.minio[0].metadata[0].name
  }
  data = {
    rootUser     = random_password.s3_access_key.result
    rootPassword = random_password.s3_secret_key.result
  }
}

resource "kubernetes_secret" "ray_token" {
  metadata {
    name      = local.ray_secret_name
    namespace = kubernetes_namespace.streamvqa.metadata[0].name
  }
  data = {
    token = random_password.ray_token.result
  }
}

# ---------------------------------------------------------------- operators

resource "helm_release" "flink_operator" {
  count      = var.install_operators ? 1 : 0
  name       = "flink-kubernetes-operator"
  namespace  = kubernetes_namespace.operators["flink"].metadata[0].name
  repository = "https://downloads.apache.org/flink/flink-kubernetes-operator-${var.operator_chart_versions.flink_operator}/"
  chart      = "flink-kubernetes-operator"
  version    = var.operator_chart_versions.flink_operator
  values = [yamlencode({
    # the admission webhook needs cert-manager; the CRDs' schemas still validate
    webhook         = { create = false }
    watchNamespaces = [var.namespace]
  })]
}

resource "helm_release" "kuberay" {
  count      = var.install_operators ? 1 : 0
  name       = "kuberay-operator"
  namespace  = kubernetes_namespace.operators["kuberay"].metadata[0].name
  repository = "https://ray-project.github.io/kuberay-helm/"
  chart      = "kuberay-operator"
  version    = var.operator_chart_versions.kuberay
}

resource "helm_release" "strimzi" {
  count      = var.install_operators ? 1 : 0
  name       = "strimzi-kafka-operator"
  namespace  = kubernetes_namespace.operators["strimzi"].metadata[0].name
  repository = "https://strimzi.io/charts/"
  chart      = "strimzi-kafka-operator"
  version    = var.operator_chart_versions.strimzi
  values = [yamlencode({
    watchNamespaces = [var.namespace]
  })]
}

# ---------------------------------------------------------------- object store

resource "helm_release" "minio" {
  count      = var.install_minio ? 1 : 0
  name       = "minio"
  namespace  = kubernetes_namespace.minio[0].metadata[0].name
  repository = "https://charts.min.io/"
  chart      = "minio"
  version    = var.operator_chart_versions.minio
  values = [yamlencode({
    mode           = "standalone"
    existingSecret = kubernetes_secret.minio_root[0].metadata[0].name
    persistence    = { enabled = true, size = var.minio_storage_size }
    resources      = { requests = { cpu = "1", memory = "4Gi" } }
    # the buckets: created by the chart's post-install job (the chart's provision job also
    # creates them idempotently, for an external S3)
    buckets = [
      { name = var.buckets.data, policy = "none", purge = false },
      { name = var.buckets.checkpoints, policy = "none", purge = false },
    ]
  })]
}

# ---------------------------------------------------------------- streamvqa

resource "helm_release" "streamvqa" {
  name      = var.release_name
  namespace = kubernetes_namespace.streamvqa.metadata[0].name
  chart     = local.chart_path
  values = [
    yamlencode({
      objectStore = {
        endpoint          = local.s3_endpoint
        bucket            = var.buckets.data
        checkpointBucket  = var.buckets.checkpoints
        credentialsSecret = kubernetes_secret.s3.metadata[0].name
      }
      topics = { partitions = var.topic_partitions }
      ray = {
        authTokenSecret   = kubernetes_secret.ray_token.metadata[0].name
        gpuWorkers        = { minReplicas = var.gpu_workers.min, maxReplicas = var.gpu_workers.max }
        operatorNamespace = local.operator_ns.kuberay
      }
      flink = { operatorNamespace = local.operator_ns.flink }
    }),
    yamlencode(var.chart_values),
  ]
  depends_on = [helm_release.flink_operator, helm_release.kuberay, helm_release.strimzi, helm_release.minio]
}
