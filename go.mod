module github.com/luksext/luksext

go 1.26.0

require (
	github.com/anatol/luks.go v0.0.0-20230125211543-ada2562d4206
	github.com/google/go-tpm v0.9.8
	github.com/sirupsen/logrus v1.10.2
	github.com/stretchr/testify v1.12.1
	github.com/ybbus/jsonrpc/v3 v3.1.6
	golang.org/x/sys v0.49.0
)

require (
	github.com/anatol/devmapper.go v0.0.0-20220907161421-ba4de5fc0fd1 // indirect
	github.com/dgryski/go-camellia v0.0.0-20191119043421-69a8a13fb23d // indirect
	go.yaml.in/yaml/v3 v3.0.5 // indirect
	golang.org/x/crypto v0.1.0 // indirect
)
