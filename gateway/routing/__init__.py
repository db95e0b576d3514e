"""Where a request goes: region order and spill, admission and capacity, replica choice
(P2C), and the attempt loop with retries, budget and hedging."""
