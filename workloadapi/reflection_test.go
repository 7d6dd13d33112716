package workloadapi

import (
	"context"
	"slices"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	reflectionv1 "google.golang.org/grpc/reflection/grpc_reflection_v1"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/descriptorpb"
)

// TestServerReflection lists the services over the socket with a real
// reflection client, which sends no security header.
func TestServerReflection(t *testing.T) {
	srv := startJWTServer(t, unixOnly, newFakeJWTSource(t, newJWTIssuer(t, "k1")))
	conn, err := grpc.NewClient("unix://"+srv.path, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	stream, err := reflectionv1.NewServerReflectionClient(conn).ServerReflectionInfo(ctx)
	if err != nil {
		t.Fatal(err)
	}
	ask := func(req *reflectionv1.ServerReflectionRequest) *reflectionv1.ServerReflectionResponse {
		t.Helper()
		if err := stream.Send(req); err != nil {
			t.Fatal(err)
		}
		resp, err := stream.Recv()
		if err != nil {
			t.Fatalf("reflection: %v", err)
		}
		return resp
	}
	var names []string
	for _, s := range ask(&reflectionv1.ServerReflectionRequest{
		MessageRequest: &reflectionv1.ServerReflectionRequest_ListServices{},
	}).GetListServicesResponse().GetService() {
		names = append(names, s.GetName())
	}
	if !slices.Contains(names, "SpiffeWorkloadAPI") {
		t.Errorf("services = %v, want SpiffeWorkloadAPI", names)
	}
	files := ask(&reflectionv1.ServerReflectionRequest{
		MessageRequest: &reflectionv1.ServerReflectionRequest_FileContainingSymbol{FileContainingSymbol: "SpiffeWorkloadAPI"},
	}).GetFileDescriptorResponse().GetFileDescriptorProto()
	if len(files) == 0 {
		t.Fatal("no file descriptor for SpiffeWorkloadAPI")
	}
	// The methods advertised are exactly those served: not go-spiffe's
	// experimental WIT-SVID methods, which answer Unimplemented.
	var methods []string
	for _, raw := range files {
		var fd descriptorpb.FileDescriptorProto
		if err := proto.Unmarshal(raw, &fd); err != nil {
			t.Fatal(err)
		}
		for _, svc := range fd.GetService() {
			if svc.GetName() != "SpiffeWorkloadAPI" {
				continue
			}
			for _, m := range svc.GetMethod() {
				methods = append(methods, m.GetName())
			}
		}
	}
	slices.Sort(methods)
	want := []string{"FetchJWTBundles", "FetchJWTSVID", "FetchX509Bundles", "FetchX509SVID", "ValidateJWTSVID"}
	if !slices.Equal(methods, want) {
		t.Errorf("advertised methods = %v, want %v", methods, want)
	}
	if resp := ask(&reflectionv1.ServerReflectionRequest{
		MessageRequest: &reflectionv1.ServerReflectionRequest_FileContainingSymbol{FileContainingSymbol: "SpiffeWorkloadAPI.FetchWITSVID"},
	}); resp.GetErrorResponse() == nil {
		t.Error("reflection describes FetchWITSVID, which the agent does not serve")
	}
}
