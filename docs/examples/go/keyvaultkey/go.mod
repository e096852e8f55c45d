module example.com/keyvaultkey

go 1.19
