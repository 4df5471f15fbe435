# The three connection settings every worker, reconciler and client needs, and the claim
# check's container.

output "storage_connection_string" {
  description = "AZURE_STORAGE_CONNECTION_STRING"
  value       = azurerm_storage_account.main.primary_connection_string
  sensitive   = true
}

output "cosmos_connection_string" {
  description = "COSMOS_DB_CONNECTION_STRING"
  value       = "AccountEndpoint=${azurerm_cosmosdb_account.main.endpoint};AccountKey=${azurerm_cosmosdb_account.main.primary_key};"
  sensitive   = true
}

output "redis_connection_string" {
  description = "REDIS_CONNECTION_STRING (TLS, port 6380)"
  value       = "rediss://:${azurerm_redis_cache.main.primary_access_key}@${azurerm_redis_cache.main.hostname}:${azurerm_redis_cache.main.ssl_port}/0"
  sensitive   = true
}

output "payload_container" {
  description = "FLOWCRAFT_PAYLOAD_CONTAINER"
  value       = azurerm_storage_container.payloads.name
}
