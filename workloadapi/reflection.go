package workloadapi

import (
	"fmt"
	"strings"

	"github.com/spiffe/go-spiffe/v2/proto/spiffe/workload"
	"google.golang.org/grpc"
	"google.golang.org/grpc/reflection"
	reflectionv1 "google.golang.org/grpc/reflection/grpc_reflection_v1"
	reflectionv1alpha "google.golang.org/grpc/reflection/grpc_reflection_v1alpha"
	"google.golang.org/protobuf/reflect/protodesc"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/reflect/protoregistry"
)

// unservedMethods are methods of the Workload API's service definition
// that the agent does not implement: go-spiffe's experimental WIT-SVIDs
// (Workload Identity Tokens). They answer Unimplemented, so reflection
// does not advertise them.
var unservedMethods = []string{"FetchWITSVID", "FetchWITBundles"}

// registerReflection serves gRPC server reflection (v1 and v1alpha) on
// srv, as the SPIFFE spec recommends, describing the Workload API without
// the methods it does not serve.
func registerReflection(srv *grpc.Server) error {
	res, err := newServedResolver()
	if err != nil {
		return err
	}
	opts := reflection.ServerOptions{Services: srv, DescriptorResolver: res}
	reflectionv1.RegisterServerReflectionServer(srv, reflection.NewServerV1(opts))
	reflectionv1alpha.RegisterServerReflectionServer(srv, reflection.NewServer(opts))
	return nil
}

// servedResolver is the global proto registry, except that the Workload
// API's file describes only the methods the agent serves.
type servedResolver struct {
	file    protoreflect.FileDescriptor // the Workload API's, filtered
	service protoreflect.FullName
}

func newServedResolver() (*servedResolver, error) {
	svc := workload.File_workload_proto.Services().ByName("SpiffeWorkloadAPI")
	if svc == nil {
		return nil, fmt.Errorf("reflection: no SpiffeWorkloadAPI service in %s", workload.File_workload_proto.Path())
	}
	fdp := protodesc.ToFileDescriptorProto(workload.File_workload_proto)
	for _, s := range fdp.GetService() {
		kept := s.Method[:0]
		for _, m := range s.GetMethod() {
			if !isUnserved(m.GetName()) {
				kept = append(kept, m)
			}
		}
		s.Method = kept
	}
	f, err := protodesc.NewFile(fdp, protoregistry.GlobalFiles)
	if err != nil {
		return nil, fmt.Errorf("reflection: %w", err)
	}
	return &servedResolver{file: f, service: svc.FullName()}, nil
}

func isUnserved(method string) bool {
	for _, m := range unservedMethods {
		if m == method {
			return true
		}
	}
	return false
}

// FindFileByPath implements protodesc.Resolver.
func (r *servedResolver) FindFileByPath(path string) (protoreflect.FileDescriptor, error) {
	if path == r.file.Path() {
		return r.file, nil
	}
	return protoregistry.GlobalFiles.FindFileByPath(path)
}

// FindDescriptorByName implements protodesc.Resolver.
func (r *servedResolver) FindDescriptorByName(name protoreflect.FullName) (protoreflect.Descriptor, error) {
	if name == r.service || strings.HasPrefix(string(name), string(r.service)+".") {
		svc := r.file.Services().ByName(r.service.Name())
		if name == r.service {
			return svc, nil
		}
		if m := svc.Methods().ByName(name.Name()); m != nil {
			return m, nil
		}
		return nil, protoregistry.NotFound
	}
	if d, err := protoregistry.GlobalFiles.FindDescriptorByName(name); err != nil || d.ParentFile().Path() != r.file.Path() {
		return d, err
	}
	// A message of the Workload API's file: the filtered file's own.
	if m := r.file.Messages().ByName(name.Name()); m != nil && m.FullName() == name {
		return m, nil
	}
	return protoregistry.GlobalFiles.FindDescriptorByName(name)
}
