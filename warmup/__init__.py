"""Online warm-up of new users (torch side): `udg warmup` reads the event stream and updates UDG embeddings."""
